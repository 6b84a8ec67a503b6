"""The README's install, followed literally (issue 8, item 4), and the daemon run the
way the unit runs it.

The shell block under "## Running it for real" runs as it stands, as root with
Debian's PATH (so ``python3`` is Debian's), in a private mount namespace whose
``/etc``, ``/opt`` and ``/var/lib`` are overlays over the real ones: the block
writes the real paths it names (``/opt/iqmaild``, ``/etc/iqmaild``, the user
in ``/etc/passwd``), and nothing of it reaches this machine. Then
``systemd-analyze verify`` checks the installed unit with the binary in place.

There is no systemd as PID 1 here, so "the daemon under its unit" cannot be
literal. The closest honest thing: in that namespace the test rebuilds the
unit's sandbox by hand — the service user with no capabilities and
NoNewPrivileges (``setpriv``), a read-only system with only the state and
runtime directories writable (ProtectSystem=strict, StateDirectory=,
RuntimeDirectory=), empty /tmp, /root and /home (PrivateTmp=, ProtectHome=),
UMask=0027 — runs the unit's ExecStartPre and ExecStart there with a
notification socket of its own, sends mail, and stops it with SIGTERM.
Slow (a fresh venv and a pip install from the package index: about 30 s on an
idle machine), but it runs in CI.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import smtplib
import subprocess
import textwrap
from pathlib import Path

import aiohttp
import pytest

from iqmaild.deliver.capture import CaptureRelay
from tests.test_durability import _free_port
from tests.test_systemd import NotifySocket

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.slow


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Running it for real") :]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match, "no sh block in the README's 'Running it for real'"
    return match.group(1)


def _needs() -> None:
    if os.geteuid() != 0:
        pytest.skip("installs as root, as the README says")
    for tool in ("unshare", "mount", "setpriv", "runuser", "systemd-sysusers", "systemd-analyze"):
        if shutil.which(tool, path=DEBIAN_PATH) is None:
            pytest.skip(f"{tool} is missing (Debian packages util-linux, mount, systemd)")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("Debian's /usr/bin/python3 is missing (python3, python3-venv)")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode()[:200]}")


def script(tmp: Path, block: str, smtp: int, http: int, relay: int, notify: str) -> str:
    overlays = "\n".join(
        f"mkdir -p {tmp}/up{i} {tmp}/work{i}\n"
        f"mount -t overlay overlay -o lowerdir={d},upperdir={tmp}/up{i},workdir={tmp}/work{i} {d}"
        for i, d in enumerate(("/etc", "/opt", "/var/lib"))
    )
    conf = "/etc/iqmaild/iqmaild.toml"
    as_service = (
        "setpriv --reuid=iqmaild --regid=iqmaild --init-groups --no-new-privs "
        "--bounding-set=-all --inh-caps=-all -- env -i PATH=/usr/bin:/bin "
        f"IQMAILD_CONFIG={conf} PYTHONUNBUFFERED=1"
    )
    return f"""
set -euo pipefail
{overlays}
cd {ROOT}
echo '=== the README block'
{block}
echo '=== checks'
echo "config=$(stat -c '%a %U %G' {conf})"
echo "state=$(stat -c '%a %U %G' /var/lib/iqmaild)"
echo "db=$(stat -c '%U' /var/lib/iqmaild/iqmaild.db)"
echo "enabled=$(readlink /etc/systemd/system/multi-user.target.wants/iqmaild.service)"
echo "passwd=$(getent passwd iqmaild)"
verify=$(systemd-analyze verify /etc/systemd/system/iqmaild.service 2>&1) && rc=0 || rc=$?
echo "verify=$rc:$verify"
echo '=== the unit sandbox, by hand'
# An operator's edit: this machine's free ports and the test's relay.
sed -i -e 's|"127.0.0.1:2526"|"127.0.0.1:{smtp}"|' -e 's|"127.0.0.1:8026"|"127.0.0.1:{http}"|' \\
    -e 's|"127.0.0.1:25"|"127.0.0.1:{relay}"|' {conf}
mount -t tmpfs -o mode=0755 tmpfs /run
install -d -m 0750 -o iqmaild -g iqmaild /run/iqmaild  # RuntimeDirectory=iqmaild
mount --bind /var/lib/iqmaild /var/lib/iqmaild  # StateDirectory= stays writable
mount --bind /run/iqmaild /run/iqmaild
for m in / /etc /opt /var/lib /run; do mount -o remount,bind,ro "$m"; done  # ProtectSystem=strict
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /var/tmp  # PrivateTmp=
mount -t tmpfs tmpfs /root; mount -t tmpfs tmpfs /home  # ProtectHome=
cd /
umask 0027
{as_service} touch /etc/iqmaild/x 2>/dev/null && echo "etc_writable=yes" || echo "etc_writable=no"
{as_service} touch /opt/iqmaild/x 2>/dev/null && echo "opt_writable=yes" || echo "opt_writable=no"
{as_service} touch /var/lib/iqmaild/probe && echo "state_writable=yes" || echo "state_writable=no"
{as_service} touch /run/iqmaild/probe && echo "run_writable=yes" || echo "run_writable=no"
{as_service} /opt/iqmaild/bin/iqmaild check-config  # ExecStartPre=
echo '=== serve'
exec {as_service} NOTIFY_SOCKET={notify} WATCHDOG_USEC=30000000 /opt/iqmaild/bin/iqmaild serve
"""


async def test_the_readme_install_works_and_the_daemon_runs_in_the_units_sandbox(
    tmp_path: Path,
) -> None:
    _needs()
    relay = CaptureRelay()
    relay_port = await relay.start()
    smtp_port, http_port = _free_port(), _free_port()
    notify = NotifySocket(None)  # abstract: reachable from the namespace's empty /tmp
    text = script(tmp_path, readme_block(), smtp_port, http_port, relay_port, notify.env)
    log = tmp_path / "install.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            text,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PATH": DEBIAN_PATH, "HOME": "/root", "LANG": "C.UTF-8"},
        )

    def output() -> str:
        return log.read_text(errors="replace")

    try:
        waited = asyncio.create_task(proc.wait())
        ready = asyncio.create_task(notify.wait_for("READY", seconds=300))
        done, _ = await asyncio.wait({waited, ready}, return_when=asyncio.FIRST_COMPLETED)
        assert ready in done, "the install or the daemon stopped:\n" + output()[-6000:]
        facts = dict(re.findall(r"^(\w+)=(.*)$", output(), re.MULTILINE))
        assert facts["config"] == "640 root iqmaild"
        assert facts["state"] == "750 iqmaild iqmaild"
        assert facts["db"] == "iqmaild"  # migrate ran as the service user
        assert facts["enabled"] == "/etc/systemd/system/iqmaild.service"
        assert facts["passwd"].endswith(":/var/lib/iqmaild:/usr/sbin/nologin")
        assert facts["verify"] == "0:", facts["verify"]
        assert facts["etc_writable"] == "no" and facts["opt_writable"] == "no"
        assert facts["state_writable"] == "yes" and facts["run_writable"] == "yes"
        assert "config ok:" in output()
        # The daemon under the sandbox takes mail and hands it to the relay.
        mail = textwrap.dedent("""\
            From: klient@example.com
            To: bok@iq.pl
            Subject: Instalacja
            Message-ID: <install@example.com>

            Dzień dobry.
            """).encode()
        await asyncio.to_thread(
            _send, smtp_port, mail.replace(b"\n", b"\r\n"), "klient@example.com", "bok@iq.pl"
        )
        for _ in range(300):
            if any(m.rcpt_tos == ["bok-staff@iq.pl"] for m in relay.messages):
                break
            await asyncio.sleep(0.1)
        assert any(m.rcpt_tos == ["bok-staff@iq.pl"] for m in relay.messages), output()[-3000:]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{http_port}/healthz") as resp,
        ):
            assert resp.status == 200, await resp.text()
        pid = int(ready.result()["MAINPID"])
        os.kill(pid, signal.SIGTERM)
        await notify.wait_for("STOPPING")
        assert await asyncio.wait_for(waited, 60) == 0, output()[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await relay.stop()
        notify.sock.close()
    assert "iqmaild:" not in Path("/etc/passwd").read_text()  # nothing leaked out


def _send(port: int, raw: bytes, sender: str, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, [rcpt], raw)
