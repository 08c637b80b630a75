"""The one-line command-line errors of the scripts: OneLineErrorParser, an argparse parser whose bad-flag message is
one line. A module of its own, importing only argparse, so that a script takes it without the training code."""
import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad command line as one line, 'error: MESSAGE', and exits with status 2,
    instead of argparse's usage block followed by the message."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")
