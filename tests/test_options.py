"""The guard of every command's numbers (issue 28): every numeric option of every command,
read from the command's own parser, gets -1, -1e-3, 0, nan, inf and 1e30. Each value is
either accepted, and then the option's range (a cli.Number, which --help states) admits
it, or refused by `main` with exit status 1 and one `error:` line naming the option, with
nothing written. In process, parse and check only: no model is built, so it takes seconds.

A new numeric option is covered the day it is added; one without a stated range fails here.
"""

import argparse
import functools
import importlib
import os
from unittest import mock

import pytest

from cli import Number, numeric_options

VALUES = ["-1", "-1e-3", "0", "nan", "inf", "1e30"]


def parse_align(argv):
    import align
    stage, cfg, _, _ = align.parse_args(argv)
    align.check_config(cfg, stage)


class Caught(Exception):
    pass


def built_parser(module, argv):
    """The parser of a command that builds it inside parse_args (align.py): caught there."""
    def catch(self, *args, **kwargs):
        raise Caught(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), pytest.raises(Caught) as e:
        module.parse_args(argv)
    return e.value.args[0]


# command: (module, the arguments it needs besides the option, its parse-and-check)
COMMANDS = {
    "train.py": ("train", [], None),
    "sample.py": ("sample", [], None),
    "align.py": ("align", ["sft", "--init_from", "base"], parse_align),
    "llava.py": ("llava", [], None),
    "evaluate.py": ("evaluate", ["--out_dir", "run", "--text", "t.txt"], None),
    "decode.py": ("decode", [], None),
    "plan.py": ("plan", [], None),
    "bench.py": ("bench", [], None),
    "bench_decode.py": ("bench_decode", [], None),
    "data/prepare.py": ("data.prepare", [], None),
}


@functools.cache
def parser_of(command):
    name, base, _ = COMMANDS[command]
    module = importlib.import_module(name)
    if hasattr(module, "argument_parser"):
        return module.argument_parser()
    return built_parser(module, base)


@functools.cache
def help_of(command):
    return " ".join(parser_of(command).format_help().split())


def options():
    return [pytest.param(command, option, id=f"{command} {option}")
            for command in COMMANDS for option, _ in numeric_options(parser_of(command))]


def cases():
    return [pytest.param(command, option, value, id=f"{command} {option} {value}")
            for command in COMMANDS for option, _ in numeric_options(parser_of(command)) for value in VALUES]


OPTIONS, CASES = options(), cases()


def test_the_guard_covers_every_command():
    """How many (command, option, value) triples the guard checks, per command."""
    counts = {c: sum(1 for p in OPTIONS if p.values[0] == c) for c in COMMANDS}
    assert counts["plan.py"] == 0  # plan.py takes no numbers (train.py --plan does)
    assert all(counts[c] > 0 for c in COMMANDS if c != "plan.py"), counts
    assert len(CASES) == len(VALUES) * len(OPTIONS)


@pytest.mark.parametrize("command, option", OPTIONS)
def test_every_numeric_option_states_its_range_in_help(command, option):
    stated = dict(numeric_options(parser_of(command)))[option].type
    assert isinstance(stated, Number), f"{command} {option} takes a number but states no range: type=cli.Number(...)"
    assert str(stated) in help_of(command), f"{command} --help does not state {option}'s range"


@pytest.mark.parametrize("command, option, value", CASES)
def test_a_number_is_accepted_as_stated_or_refused_in_one_line(command, option, value, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.chdir(tmp_path)  # relative default paths (out/..., data/...) land here, if anywhere
    monkeypatch.delenv("NANO_QUICK", raising=False)
    name, base, parse = COMMANDS[command]
    module = importlib.import_module(name)
    stated = dict(numeric_options(parser_of(command)))[option].type
    argv = base + [option, value]
    try:
        (parse or module.parse_args)(argv)
        accepted = True
    except ValueError as e:
        accepted = False
        assert "\n" not in str(e) and option.lstrip("-") in str(e), str(e)
    if accepted:
        try:
            number = stated.kind(value) if isinstance(stated, Number) else None
        except ValueError:
            number = None
        assert number is not None and stated.admits(number), \
            f"{command} accepts {option} {value}, but its --help states no range that admits it"
    else:  # the command itself: exit 1, one line, before any work
        with pytest.raises(SystemExit) as e:
            module.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and err.startswith("error: ") and "\n" not in err, err
    assert os.listdir(tmp_path) == []  # nothing written


# ----------------------------------------------------------------------------- --help (issue 34 item 7)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_every_options_description_and_default(command):
    name, base, _ = COMMANDS[command]
    module = importlib.import_module(name)
    parser = module.argument_parser() if hasattr(module, "argument_parser") else built_parser(module, base)
    options = [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS and a.dest != "help"]
    undescribed = [a.option_strings[0] for a in options if not a.help or a.help.startswith("default ")]
    assert not undescribed, f"{command}: options without a description in --help"
    parser.format_help()
    assert [a.option_strings[0] for a in options if a.nargs != 0 and "default" not in a.help] == []


def test_train_help_reads_the_dataclass_comment():
    import train
    help_line = {a.dest: a for a in train.argument_parser()._actions}
    from cli import help_text
    assert help_text(help_line["eval_iters"]) == ("batches per split in an evaluation; default 20 (first: 10, "
                                                  "tinyllama_1b: 50); >= 1")
    assert help_text(help_line["n_kv_head"]) == ("== n_head: MHA; 1: MQA; in between: GQA; default 2 "
                                                 "(tinyllama_1b: 4); a positive integer")
