"""The pipeline's library: plain functions the stages (stages/, run by dvc.yaml) and the tools (tools/) call,
and the tests call without DVC. Python 3.11 or newer: it uses hashlib.file_digest and `X | Y` annotations."""
import sys

if sys.version_info < (3, 11):  # before any module that needs 3.11 is imported: one line, not a traceback
    sys.exit(f"error: this project needs Python 3.11 or newer; this is Python "
             f"{'.'.join(map(str, sys.version_info[:3]))}")
