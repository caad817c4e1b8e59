#!/usr/bin/env python3
"""Runs the shell commands of README.md's fenced ```sh blocks as a new user would, from the
repository root, and fails if any fails. CI runs it after the tests (the binaries are built
by then, and `tools/test.sh` has fetched the HH splits).

What it changes, and why:
- the main job (`trainer experiment` without arguments, ~15 minutes) runs as `--quick`, into a
  temporary folder: the command and its binary are checked, not the study;
- `tools/test.sh` is skipped: CI has just run it;
- a `model-server --listen ADDR` line starts the server in the background; the block's other
  lines run against it, then it is stopped. `grpcurl` lines run only where grpcurl is
  installed (the README says it is optional);
- outputs (`--out DIR`, `report DIR`) go to a temporary folder instead of `results/`.

Usage: python3 tools/readme_commands.py [README.md]
"""

import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 600


def sh_blocks(text):
    """The lines of every ```sh block, continuation lines joined."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)
    out = []
    for block in blocks:
        lines, pending = [], ""
        for line in block.splitlines():
            line = line.rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = pending + line
            pending = ""
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
        out.append(lines)
    return out


def wait_for_port(address, seconds=60):
    host, port = address.rsplit(":", 1)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {address} after {seconds} s")


def rewrite(command, scratch):
    """The command as CI runs it (see the module docs); None to skip it."""
    command = re.sub(r"(?<!\S)results/", f"{scratch}/results/", command)
    parts = [p.strip() for p in command.split("&&")]
    rewritten = []
    for part in parts:
        words = shlex.split(part)
        if words and words[0].endswith("tools/test.sh"):
            print(f"  skip (CI ran it): {part}")
            return None
        if len(words) == 2 and words[0].endswith("trainer") and words[1] == "experiment":
            part = f"{part} --quick --out {scratch}/results/sandbox"
        rewritten.append(part)
    return " && ".join(rewritten)


def run_block(lines, scratch):
    server = None
    try:
        for line in lines:
            words = shlex.split(line.split("#")[0])
            if words and words[0] == "grpcurl" and shutil.which("grpcurl") is None:
                print(f"  skip (grpcurl not installed; optional): {line}")
                continue
            if words and words[0].endswith("model-server") and "--listen" in words:
                address = words[words.index("--listen") + 1]
                print(f"  start: {line}")
                server = subprocess.Popen(words, cwd=ROOT)
                wait_for_port(address)
                continue
            command = rewrite(line, scratch)
            if command is None:
                continue
            print(f"  run: {command}", flush=True)
            started = time.time()
            subprocess.run(
                command, shell=True, cwd=ROOT, check=True, timeout=TIMEOUT_SECONDS,
                stdout=subprocess.DEVNULL,
            )
            print(f"  ok in {time.time() - started:.0f} s", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def main():
    readme = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md"
    blocks = sh_blocks(readme.read_text())
    if not blocks:
        sys.exit(f"no ```sh blocks in {readme}")
    with tempfile.TemporaryDirectory(prefix="readme-commands-") as scratch:
        for i, lines in enumerate(blocks, 1):
            print(f"block {i} of {len(blocks)}")
            try:
                run_block(lines, scratch)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as e:
                sys.exit(f"README block {i} failed: {e}")
    print(f"all {len(blocks)} README blocks ran")


if __name__ == "__main__":
    main()
