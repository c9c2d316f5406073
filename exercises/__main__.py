"""python -m exercises {grade, hint, stubs, reset}: grade your exercises, get a hint, start a file over.

    python -m exercises grade 00                 grade exercises/ex00_tiny_transformer.py
    python -m exercises grade all --json         every chapter, machine-readable
    python -m exercises grade 00 --exercise 0.3  one exercise
    python -m exercises hint 4.3                 a hint: level 1, then 2, then 3 on repeated calls
    python -m exercises hint 4.3 --level 2       a given level
    python -m exercises reset 00 --yes           overwrite your file with the stub
    python -m exercises stubs [--check]          (maintainers) regenerate the stubs from the library

grade exits with status 0 only at full marks, 1 otherwise, 2 when the grader itself cannot run.
"""

import argparse
import sys
from pathlib import Path

from exercises.grading.registry import CHAPTERS, chapter_of, get_chapter
from exercises.grading.stubs import MarkerError


def _chapters(name: str):
    return list(CHAPTERS.values()) if name == "all" else [get_chapter(name)]


def _grade(args) -> int:
    from exercises.grading.grader import GraderError, Source, format_json, format_report, format_total, grade

    chapters = _chapters(args.chapter)
    if (args.file or args.mutant) and len(chapters) > 1:
        print("--file and --mutant grade one chapter's file: name the chapter (e.g. `grade 00 --file ...`)",
              file=sys.stderr)
        return 2
    reports = []
    for chapter in chapters:
        wanted = [e for e in args.exercise if chapter_of(e) == chapter.number] if args.exercise else None
        if args.exercise and not wanted and len(chapters) > 1:
            continue  # `grade all --exercise 2.1` grades chapter 02 only
        if args.reference:
            source = Source("reference")
        elif args.mutant:
            from exercises.grading.mutants import find

            mutant = find(chapter, args.mutant)  # KeyError naming the chapter's mutants when unknown
            source = Source("mutant", exercises=(mutant.exercise,), mutant=mutant.name)
        else:
            source = Source("file", args.file or str(chapter.student_file))
        if source.path and not Path(source.path).is_file():
            print(f"no such file: {source.path}" + (f" (`python -m exercises reset {chapter.number} --yes` "
                  "recreates it)" if not args.file else ""), file=sys.stderr)
            return 2
        try:
            reports.append(grade(chapter, source, wanted or args.exercise, timeout=args.timeout))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        except GraderError as exc:
            print(f"grader error (not your code): {exc}", file=sys.stderr)
            return 2
        if not args.json:
            print(format_report(reports[-1]) + "\n")
    if not reports:
        print(f"no chapter has exercise {', '.join(args.exercise)}", file=sys.stderr)
        return 2
    if args.json:
        print(format_json(reports))
    elif len(reports) > 1:
        print(format_total(reports))
    return 0 if all(r["full_marks"] for r in reports) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exercises", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade a chapter's exercises (exit status 0 only at full marks)")
    g.add_argument("chapter", help="a chapter number (00) or `all`")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--file", help="the file to grade (default: the chapter's exercises/exNN_<topic>.py)")
    which.add_argument("--reference", action="store_true", help="grade the reference solutions (the library)")
    which.add_argument("--mutant", metavar="NAME",
                       help="grade the reference with this mutant's patch (exercises/grading/mutants/chNN_<topic>.md)")
    g.add_argument("--exercise", action="append", metavar="ID", help="grade only this exercise (repeatable)")
    g.add_argument("--timeout", type=float, default=None, metavar="S", help="time limit per check (20 s)")
    g.add_argument("--json", action="store_true", help="print the results as JSON")
    h = sub.add_parser("hint", help="a progressive hint for one exercise (level 1, then 2, then 3)")
    h.add_argument("exercise", help="an exercise id, e.g. 4.3")
    h.add_argument("--level", type=int, default=None, help="show this level (1 to 3)")
    s = sub.add_parser("stubs", help="regenerate exercises/exNN_*.py from the library's marked regions")
    s.add_argument("--check", action="store_true", help="only compare; exit 1 if a stub is out of sync")
    s.add_argument("--force", action="store_true", help="overwrite a file even if it holds solutions")
    r = sub.add_parser("reset", help="overwrite your exercise file with its stub")
    r.add_argument("chapter", help="a chapter number (00) or `all`")
    r.add_argument("--yes", action="store_true", help="really overwrite (without it: say what would change)")
    args = parser.parse_args(argv)
    try:
        if args.command == "grade":
            from exercises.grading.grader import DEFAULT_TIMEOUT_S

            args.timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
            return _grade(args)
        if args.command == "hint":
            from exercises.grading.hints import show

            return show(args.exercise, args.level)
        if args.command == "reset":
            from exercises.grading.stubs import reset

            return reset(_chapters(args.chapter), yes=args.yes)
        from exercises.grading.stubs import write_stubs

        return write_stubs(check=args.check, force=args.force)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    except MarkerError as exc:
        print(f"exercise markers: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
