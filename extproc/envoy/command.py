"""``extproc envoy-config``: write Envoy's bootstrap for a configuration file.

Cheap to import: the generator (Envoy's typed configuration classes, about a second to import) is loaded
only when the command runs. ``python -m extproc.envoy.command`` takes the same options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.cli import DefaultsHelp
from extproc.config import ConfigError, load_config

if TYPE_CHECKING:
    from extproc.tls import ClientTls


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="extproc configuration file (YAML)")
    p.add_argument("--listen", default="127.0.0.1:8080", help="host:port of the gateway listener")
    p.add_argument("--admin", default="127.0.0.1:9901", help="host:port of Envoy's admin interface")
    p.add_argument(
        "--ext-proc",
        default=None,
        help="ext_proc address, host:port or unix:/path, or several replicas comma-separated (default: server.listen)",
    )
    tls = p.add_argument_group("TLS to the ext_proc (a picker with server.tls; docs/tls.md); paths as Envoy sees them")
    tls.add_argument("--ext-proc-ca", help="CA that signed the picker's certificate; turns TLS on")
    tls.add_argument(
        "--ext-proc-server-name",
        help="name the picker's certificate must carry, also sent as SNI (default: the --ext-proc host(s))",
    )
    tls.add_argument("--ext-proc-cert", help="Envoy's client certificate, for a picker with server.tls.client_ca_file")
    tls.add_argument("--ext-proc-key", help="the client certificate's private key")
    tls.add_argument(
        "--secrets-dir",
        help="where to write the SDS files of the client certificate and the CA, which make Envoy re-read them "
        "when they are renewed (default: the --output file's directory; with --output -, none: read once at start)",
    )
    p.add_argument("--message-timeout-ms", type=int, default=200, help="ext_proc per-message timeout")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="largest buffered request (default: limits.max_body_bytes; twice that with gateway.json_errors off)",
    )
    p.add_argument(
        "--fallback", choices=["round_robin", "least_request"], default="round_robin", help="pool policy without a pick"
    )
    p.add_argument("--route-timeout", type=float, default=300.0, help="seconds an upstream response may take")
    p.add_argument("--access-log", action="store_true", help="log every request to Envoy's stdout")
    p.add_argument(
        "--eds-dir",
        default=None,
        help="pool clusters read their members from EDS files here, written now for static pools "
        "(default: server.eds_dir; without either, STATIC/DNS clusters)",
    )
    p.add_argument("-o", "--output", default="-", help="output file ('-' = stdout)")


def ext_proc_tls(args: argparse.Namespace) -> ClientTls | None:
    """The --ext-proc-* TLS options as one setting (None: plaintext); ValueError naming a missing option."""
    from extproc.tls import ClientTls

    given = [o for o in ("server_name", "cert", "key") if getattr(args, f"ext_proc_{o}") is not None]
    if args.ext_proc_ca is None:
        if given:
            raise ValueError(
                f"--ext-proc-{given[0].replace('_', '-')} needs --ext-proc-ca (the CA of the picker's certificate)"
            )
        return None
    if (args.ext_proc_cert is None) != (args.ext_proc_key is None):
        raise ValueError("a client certificate needs both --ext-proc-cert and --ext-proc-key")
    return ClientTls(args.ext_proc_ca, args.ext_proc_server_name, args.ext_proc_cert, args.ext_proc_key)


def secrets_dir(args: argparse.Namespace) -> str | None:
    """--secrets-dir, else the output file's directory (Envoy reads the bootstrap there, so it can read this)."""
    if args.secrets_dir is not None:
        return str(args.secrets_dir)
    if args.ext_proc_ca is None or args.output == "-":  # no TLS to the picker, or nowhere to write the files
        return None
    return str(Path(args.output).resolve().parent)


def run(args: argparse.Namespace) -> int:
    try:
        from extproc.envoy.bootstrap import render_bootstrap  # Envoy's typed config: a second to import

        config = load_config(args.config)
        text = render_bootstrap(
            config,
            ext_proc_tls=ext_proc_tls(args),
            listen=args.listen,
            admin=args.admin,
            ext_proc=args.ext_proc,
            message_timeout_ms=args.message_timeout_ms,
            max_request_bytes=args.max_request_bytes,
            fallback=args.fallback,
            route_timeout_s=args.route_timeout,
            access_log=args.access_log,
            eds_dir=args.eds_dir,
            secrets_dir=secrets_dir(args),
        )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"extproc envoy-config: error: {exc}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``extproc envoy-config``."""
    p = sub.add_parser(
        "envoy-config",
        help="write the Envoy bootstrap for an extproc configuration",
        description="Write Envoy's bootstrap (listener, ext_proc filter, one override_host cluster per pool).",
        formatter_class=DefaultsHelp,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extproc envoy-config", description="Write Envoy's bootstrap.")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
