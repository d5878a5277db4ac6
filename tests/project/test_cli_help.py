"""Every command of both CLIs has a description, and every option has help text and one spelling.

The parsers are captured where each command builds them (``parse_args`` is intercepted before it reads
anything), so a flag added anywhere without help, or a second spelling of ``--model``, fails here.
"""
from __future__ import annotations

import argparse
import importlib

import pytest


class _Parsed(Exception):
    pass


def _walk(p: argparse.ArgumentParser, name: str, out: dict[str, argparse.ArgumentParser]) -> None:
    if not p.add_help:  # zeropur-export's placeholders for commands that build their own parser
        return
    out[name] = p
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sub, sp in act.choices.items():
                _walk(sp, f"{name} {sub}", out)


def parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    from zeropur_rt.cli import _parser
    out: dict[str, argparse.ArgumentParser] = {}
    _walk(_parser(), "zeropur-rt", out)
    pytest.importorskip("torch")
    from zeropur_export.cli import COMMANDS, make_parser
    _walk(make_parser(), "zeropur-export", out)

    def capture(self, *a, **k):
        raise _Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for cmd, (target, _) in COMMANDS.items():
        mod, fn = target.split(":")
        for argv in ([], ["eval"]) if cmd == "calibrate" else ([],):
            with pytest.raises(_Parsed) as got:
                getattr(importlib.import_module(mod), fn)(argv)
            out[" ".join(["zeropur-export", cmd, *argv])] = got.value.args[0]
    return out


def test_every_command_and_option_is_described(monkeypatch):
    found = parsers(monkeypatch)
    assert {"zeropur-rt serve", "zeropur-rt query", "zeropur-export fetch", "zeropur-export calibrate eval"} <= set(found)
    bare = [f"{name} {act.option_strings[0] if act.option_strings else act.dest}" for name, p in found.items()
            for act in p._actions if act.help is None
            and not isinstance(act, (argparse._HelpAction, argparse._SubParsersAction))]
    assert bare == [], "options without help text"
    assert [name for name, p in found.items() if not p.description] == [], "commands without a description"


def test_the_model_option_has_one_spelling(monkeypatch):
    shown = {name: {s for act in p._actions if act.help != argparse.SUPPRESS for s in act.option_strings}
             for name, p in parsers(monkeypatch).items()}
    assert not [name for name, opts in shown.items() if "--models" in opts]
    assert all("--model" in shown[c] for c in ("zeropur-export demo", "zeropur-export eval", "zeropur-export fetch",
                                              "zeropur-export bench", "zeropur-export calibrate"))
