"""The whole `bulkhead` command tree as one argparse parser, for generated shell completion (shtab) and
the man page (argparse-manpage). Never on a command's start path: `bulkhead` dispatches through
bulkhead.cli's table and each command builds its own parser when it runs, so completion costs nothing
at start (install.sh and `make completion man` run this once).

Each command's parser is captured by running its main with parse_args replaced by a hook that hands
the parser back (nothing else of the command runs); `bulkhead run` has its argparse parser for --help
only (runtime/cli._parser); commands dispatched by name (`audit witness`, `attest policy`) are attached
to their parents.

    python -m bulkhead.clitree completion bash|zsh|tcsh   # to stdout
    python -m bulkhead.clitree man [-o FILE]              # roff, section 1
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["build_parser", "main"]


class _Captured(BaseException):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _capture(fn: Callable[[list[str]], int], argv: list[str]) -> argparse.ArgumentParser | None:
    def hook(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = hook  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = hook  # type: ignore[method-assign]
    try:
        fn(argv)
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved  # type: ignore[method-assign]
    return None


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    return None


def _attach(parent: argparse.ArgumentParser, name: str, child: argparse.ArgumentParser | None, help_: str) -> None:
    sub = _subparsers(parent)
    if sub is None or child is None:
        return
    child.prog = f"{parent.prog} {name}"
    sub.choices[name] = child
    sub._choices_actions.append(sub._ChoicesPseudoAction(name, (), help_))


def _publish(p: argparse.ArgumentParser) -> None:
    """List every subcommand: argparse records a subcommand for completion only when it was given a help
    text, so once one sibling has help (vm shutdown/console) the others would vanish from completion."""
    sub = _subparsers(p)
    if sub is None:
        return
    listed = {a.dest for a in sub._choices_actions}
    for name, child in sub.choices.items():
        if name not in listed:
            sub._choices_actions.append(sub._ChoicesPseudoAction(name, (), child.description or ""))
        _publish(child)


def build_parser() -> argparse.ArgumentParser:
    from bulkhead import __version__
    from bulkhead.cli import COMMANDS

    top = argparse.ArgumentParser(prog="bulkhead", description="A security-hardened VMM and its management "
                                  "plane on Linux KVM: run guests, manage them through the daemon, verify.")
    top.add_argument("-V", "--version", action="version", version=f"bulkhead {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, func, help_) in COMMANDS.items():
        if help_.startswith("(internal)"):
            continue
        if name == "run":
            from bulkhead.runtime.cli import _parser

            parser: argparse.ArgumentParser | None = _parser()
        else:
            parser = _capture(getattr(importlib.import_module(module), func), ["x"])
        if parser is None:  # a command without an argparse tree (e.g. `fleet`): its name still completes
            parser = argparse.ArgumentParser(prog=f"bulkhead {name}", description=help_)
        if name == "audit":
            from bulkhead.daemon.witness_cli import witness_main

            _attach(parser, "witness", _capture(witness_main, ["x"]), "audit witnesses (docs/AUDIT.md)")
        if name == "attest":
            from bulkhead.daemon.ops_cli import policy_main

            _attach(parser, "policy", _capture(policy_main, ["x"]), "the attestation policy, through the daemon")
        _publish(parser)
        parser.prog = f"bulkhead {name}"
        sub.choices[name] = parser
        sub._choices_actions.append(sub._ChoicesPseudoAction(name, (), help_))
    return top


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bulkhead.clitree")
    s = p.add_subparsers(dest="what", required=True)
    c = s.add_parser("completion")
    c.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    m = s.add_parser("man")
    m.add_argument("-o", "--out")
    a = p.parse_args(args)
    tree = build_parser()
    if a.what == "completion":
        import shtab

        sys.stdout.write(shtab.complete(tree, shell=a.shell))
        return 0
    from argparse_manpage.manpage import Manpage

    from bulkhead import __version__

    text = str(Manpage(tree, format="single-commands-section", _data={
        "project_name": "bulkhead", "version": __version__, "description": "security-hardened VMM",
        "url": "", "prog": "bulkhead"}))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
