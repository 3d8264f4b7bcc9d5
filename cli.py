"""The command line, one behaviour for every command (train.py, sample.py, decode.py, ...):

  - a numeric option's type is a Number: its range is checked where the value is parsed,
    before any work, and --help states it next to the option's description and default;
  - -1e-3, -inf and nan are values, not options (argparse alone reads "-1e-3" as an option
    and says "expected one argument");
  - bad input is a ValueError: the command prints it as one `error:` line and exits 1
    (runs.exit_with_error), never argparse's usage block and exit status 2.

Options generated from a dataclass (train.py's TrainConfig and model.py's ModelConfig)
take their description from the field's comment in the source: one place says what a
field means, the code and --help read the same line.
"""

import argparse
import functools
import inspect
import io
import math
import numbers
import re
import sys
import tokenize
from dataclasses import dataclass


@dataclass(frozen=True)
class Number:
    """The values a numeric option admits: an int or a finite float from low to high (None:
    no bound); an open end excludes its bound. `text` says it in other words."""
    kind: type = float
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    text: str = ""

    def __str__(self):
        if self.text:
            return self.text
        low, high = (f"{x:g}" if isinstance(x, float) else f"{x}" for x in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
                    + (" (an integer)" if self.kind is int else ""))
        above = f"{'>' if self.low_open else '>='} {low}" if self.low is not None else ""
        if self.kind is int:
            return above or (f"<= {high}" if self.high is not None else "an integer")
        return "a finite number" + (f" {above}" if above else "") + (f" <= {high}" if self.high is not None else "")

    def admits(self, value):
        if self.kind is int and not isinstance(value, numbers.Integral):  # int, or one of numpy's ints
            return False
        if self.kind is float and not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def check(self, name, value):
        """A value from anywhere (a config, a resumed run): one line naming the field."""
        if not self.admits(value):
            raise ValueError(f"{name} must be {self}, got {value}")
        return value

    def __call__(self, text):
        """argparse's type: the text -> a number in range, or why not."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a {self.kind.__name__}, got {text!r}") from None
        if not self.admits(value):
            raise argparse.ArgumentTypeError(f"must be {self}, got {value}")
        return value


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with the three behaviours above."""

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        """`--option -1e-3` -> `--option=-1e-3`: a value that starts with a minus sign."""
        joined = []
        for arg in (sys.argv[1:] if args is None else list(args)):
            action = self._option_string_actions.get(joined[-1]) if joined else None
            if action is not None and action.nargs is None and arg.startswith("-") and is_number(arg):
                joined[-1] = f"{joined[-1]}={arg}"
            else:
                joined.append(arg)
        return super().parse_known_args(joined, namespace)

    def error(self, message):
        """argparse's "argument --x: must be ..." -> "--x must be ...", raised, not printed."""
        raise ValueError(re.sub(r"^argument ([^\s:/]+)[^\s:]*: (must be|expects)", r"\1 \2", message))

    def format_help(self):
        for action in self._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS and action.dest != "help":
                action.help = help_text(action)
        return super().format_help()


def help_text(action):
    """An option's line in --help: its description, the range of a number, its default."""
    if getattr(action, "described", False):
        return action.help
    parts = [action.help] if action.help else []
    if isinstance(action.type, Number):
        parts.append(str(action.type).replace("%", "%%"))
    if action.nargs != 0 and "default" not in (action.help or ""):
        parts.append(f"default {action.default!r}".replace("%", "%%"))
    action.described = True
    return "; ".join(parts)


@functools.cache
def field_comments(cls):
    """{field name: its comment} from a dataclass's source, `name: type = default  # comment`."""
    comments, source = {}, inspect.getsource(cls)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            match = re.match(r"\s+(\w+)\s*:", lines[tok.start[0] - 1][:tok.start[1]])
            if match:
                comments[match.group(1)] = tok.string.lstrip("#").strip()
    return comments


def numeric_options(parser):
    """(option, action) of every option that takes a number: its type is a Number, int or float."""
    return [(action.option_strings[0], action) for action in parser._actions if action.option_strings
            and (isinstance(action.type, Number) or action.type in (int, float))]
