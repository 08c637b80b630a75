"""The one-line command-line errors of the scripts: OneLineErrorParser, an argparse parser whose bad-flag message is
one line, and describeError, an exception in a few words. A module of its own, importing only argparse, so that a
script takes it without the training code."""
import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad command line as one line, 'error: MESSAGE', and exits with status 2,
    instead of argparse's usage block followed by the message."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def describeError(error, limit=120):
    """The error's type and the start of its message, short enough for a one-line report."""
    text = str(error).strip()
    text = text.splitlines()[0] if text else ""
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
