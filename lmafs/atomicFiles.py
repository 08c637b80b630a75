"""Writing a file so that a crash never leaves half of it under its name: the content goes to a temporary file in
the same folder (PATH.PID.tmp: the process id keeps two writers apart, the suffix keeps globs such as *.bin or *.png
from matching it), reaches the disk, and is then renamed over PATH. Every writer of the repository uses it."""
import os


def temporaryPath(path):
    return f"{path}.{os.getpid()}.tmp"


def atomicWrite(path, writeTo):
    """Call writeTo(temporaryPath), which writes the whole file there, then rename that to path."""
    tmp = temporaryPath(path)
    try:
        writeTo(tmp)
        with open(tmp, "rb") as f:
            # without it a crash right after the rename could leave an empty file under the final name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomicWriteText(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomicWrite(path, write)
