"""`gpu-health-exporter health list|clear`: talk to the running daemon over its control socket.

Clears go through the daemon only: it owns the state file and must tell the device plugin at once.
Editing the file behind a running daemon would be overwritten, and editing it while none runs would
bypass the audit log, so a clear with no daemon explains and exits 1. `list` with no daemon falls
back to reading the state file (read-only), which helps when the daemon is down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from exporter.config import DEFAULTS
from exporter.health.control import CONTROL_SOCKET, ControlError, request
from exporter.health.state import STATE_FILE, read_state_file

DEFAULT_STATE_DIR = str(DEFAULTS.state_dir)
_ENV = "GPU_HEALTH_EXPORTER_STATE_DIR"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu-health-exporter health", description="Inspect and clear GPU health state.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_dir = os.environ.get(_ENV, DEFAULT_STATE_DIR)
    ls = sub.add_parser("list", help="show every GPU and MIG device with its health and reasons")
    ls.add_argument("--state-dir", default=default_dir, help=f"daemon state dir (default {default_dir})")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cl = sub.add_parser("clear", help="mark devices healthy again after repair (logged with the reason)")
    cl.add_argument("--gpu", required=True, help="GPU or MIG UUID, GPU index, or 'all'")
    cl.add_argument("--reason", required=True, help="why (recorded in the daemon's log)")
    cl.add_argument("--state-dir", default=default_dir, help=f"daemon state dir (default {default_dir})")
    return ap


def _offline_devices(state_dir: Path) -> list[dict[str, Any]]:
    from exporter.health.expose import reason_json, top_action

    doc = read_state_file(state_dir)
    out = []
    for uuid, rec in doc.devices.items():
        reasons = [r.freeze() for r in rec.reasons.values()]
        out.append(
            {
                "uuid": uuid,
                "kind": rec.kind,
                "index": rec.index,
                "state": rec.own_state.name.lower(),
                "reasons": [reason_json(r) for r in reasons],
                "action": top_action([r.action for r in reasons]),
            }
        )
    return out


def _print_table(devices: list[dict[str, Any]]) -> None:
    rows = [("INDEX", "UUID", "STATE", "ACTION", "REASONS")]
    for d in devices:
        reasons = ", ".join(
            f"{r['signal']}{':' + r['code'] if r['code'] else ''} x{r['count']}" for r in d.get("reasons", [])
        )
        index = "" if d.get("index") is None else str(d["index"])
        if d.get("kind") == "mig":
            index += f"/gi{d.get('gpu_instance_id')}"
        rows.append((index, d["uuid"], d["state"], d.get("action", ""), reasons or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    state_dir = Path(args.state_dir)
    sock = state_dir / CONTROL_SOCKET
    if args.cmd == "list":
        try:
            resp = request(sock, {"op": "list"})
            devices = resp.get("devices", []) if resp.get("ok") else None
        except ControlError as e:
            devices = None
            print(f"note: {e}; showing the state file instead (may be out of date)", file=sys.stderr)
            try:
                devices = _offline_devices(state_dir)
            except FileNotFoundError:
                devices = []
            except (OSError, ValueError) as err:
                print(f"error: cannot read {state_dir / STATE_FILE}: {err}", file=sys.stderr)
                return 1
        if devices is None:
            print(f"error: {resp.get('error')}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(devices, indent=1))
        else:
            _print_table(devices)
        return 0
    reason = args.reason.strip()
    if not reason:
        print("error: --reason must not be empty", file=sys.stderr)
        return 2
    try:
        resp = request(sock, {"op": "clear", "target": args.gpu, "reason": reason})
    except ControlError as e:
        print(
            f"error: {e}.\nClears go through the running exporter so that the device plugin and the state file "
            "change together; start it (or run this inside its pod) and retry.",
            file=sys.stderr,
        )
        return 1
    if not resp.get("ok"):
        print(f"error: {resp.get('error')}", file=sys.stderr)
        return 1
    for uuid in resp.get("cleared", []):
        print(f"cleared {uuid}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
