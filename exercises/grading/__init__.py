"""The grader's machinery; the learner never edits anything here.

    registry.py         which library files feed which chapter: one row per chapter
    stubs.py            marked library regions -> the stub files exercises/exNN_<topic>.py
    checking.py         Check, Exercise, Violation and the guard around every call of the learner's function
    checks/chNN_*.py    per exercise: points, hints, graded checks (common.py: what they share)
    mutants/chNN_*.md   known-wrong solutions, each a patch of a reference region (mutants/__init__.py: the format)
    grader.py           runs the checks in a separate, killable worker process (_worker.py) and reports
    hints.py            `python -m exercises hint 4.3`
"""
