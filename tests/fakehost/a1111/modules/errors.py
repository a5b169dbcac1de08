# Follows modules/errors.py of AUTOMATIC1111 v1.10.1 (82a973c0): report/display print and never raise.
import sys
import traceback

reported = []


def report(message: str, *, exc_info: bool = False) -> None:
    reported.append(message)
    print(message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def display(e: Exception, task, *, full_traceback=False):
    reported.append(f"{task}: {type(e).__name__}: {e}")
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    print(e, file=sys.stderr)
