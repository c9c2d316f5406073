"""Graded exercises: stubs generated from the library's marked regions, a contained grader, and mutants
(known-wrong solutions) that prove the grader rejects what it should.

See exercises/README.md (the workflow) and exercises/grading/registry.py (how to add a chapter's exercises).
"""
