"""`bulkhead ui login`: a single-use login link for the web console (docs/UI.md "Authentication"),
asked of the daemon over the usual mTLS or local-socket connection (POST /v1/ui/login-links); the link
logs a browser in as the caller, is valid for 60 seconds and works once.
"""

from __future__ import annotations

import json
from typing import Any

from bulkhead.daemon.cli import _client, _common, _Parser, _run, _state_dir
from bulkhead.errors import ConfigError

__all__ = ["ui_main"]


def _console_base(args: Any) -> str:
    if args.ui_url:
        return str(args.ui_url).rstrip("/")
    try:
        info = json.loads((_state_dir(args) / "serve.json").read_text())
    except (OSError, ValueError):
        info = {}
    port = info.get("ui_port")
    if not port:
        raise ConfigError("the daemon serves no web console: start it with `bulkhead serve --ui-port 8444` "
                          "(or give --ui-url)")
    return f"https://{info.get('host', '127.0.0.1')}:{port}"


def ui_main(argv: list[str]) -> int:
    p = _Parser(prog="bulkhead ui", description="the web console (docs/UI.md)")
    sub = p.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("login", help="print a single-use login link (60 s) for the web console")
    _common(lg)
    lg.add_argument("--ui-url", help="https://host:port of the console (default: serve.json's ui_port)")
    args = p.parse_args(argv)

    def go() -> int:
        base = _console_base(args)
        link = _client(args).post("/ui/login-links", {})
        if args.json:
            print(json.dumps({"url": base + link["path"], "expires_in": link["expires_in"]}))
        else:
            print(f"{base}{link['path']}\n(valid once, for {int(link['expires_in'])} s)")
        return 0

    return _run(go)
