"""Real servers for the end-to-end tests: Dovecot, Postfix and the daemon.

Each one is started from a configuration written under a run directory, on free
loopback ports, without systemd, and stopped by its own stop command (``doveadm
-c FILE stop``, ``postfix -c DIR stop``, SIGTERM to the daemon's PID) with
SIGKILL as the last resort. Dovecot and Postfix run under ``reaper.py`` (a
child subreaper), so their processes are reaped even though PID 1 of the test
machine is not an init, and so the fixture knows when they are really gone.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import DESK, DIRECTORY, STAFF, config_dict, to_toml

HERE = Path(__file__).parent
CONF = HERE / "conf"
REAPER = HERE / "reaper.py"

POSTFIX = "/usr/sbin/postfix"
POSTMAP = "/usr/sbin/postmap"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
CHROMIUM = "/usr/bin/chromium"
BINARIES = (POSTFIX, POSTMAP, POSTQUEUE, POSTSUPER, DOVECOT, DOVEADM, CHROMIUM)
MAIL_USER = "mail"  # Debian's base-passwd account; owns the Dovecot mailboxes
PASSWORD = "secret"

# Every mailbox the tests read or that customers write from (unknown senders
# need a mailbox too: their notices must land somewhere).
USERS = (
    STAFF,
    "owner@acme.test",
    "tech@acme.test",
    "extra@acme.test",
    "dev@partner.test",
    "mail-admin@partner.test",
    "boss@beta.test",
    "stranger@unknown.test",
    "friend@elsewhere.test",
    "łukasz@acme.test",
)


def missing_prerequisites() -> str | None:
    """Why the e2e tests cannot run here, or None."""
    absent = [b for b in BINARIES if not os.access(b, os.X_OK)]
    if absent:
        return "e2e needs the Debian packages postfix dovecot-imapd dovecot-lmtpd chromium: " + (
            "missing " + ", ".join(absent)
        )
    if not Path("/usr/lib/dovecot/imap").exists() or not Path("/usr/lib/dovecot/lmtp").exists():
        return "e2e needs dovecot-imapd and dovecot-lmtpd (no /usr/lib/dovecot/imap or lmtp)"
    if os.geteuid() != 0:
        return "e2e starts Postfix, which only root can start"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "e2e needs the Python package playwright (pip install -e '.[test]')"
    return None


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def fill(template: str, **values: Any) -> str:
    out = (CONF / template).read_text(encoding="utf-8")
    for key, value in values.items():
        out = out.replace(f"@{key}@", str(value))
    leftover = re.findall(r"@[A-Z_]+@", out)
    assert not leftover, f"{template}: unfilled {leftover}"
    return out


def write_config_file(path: Path, text: str) -> None:
    """Write a Postfix file with an mtime in the past.

    Postfix programs re-read main.cf for up to two seconds while its mtime is
    within the current second (the file may still be being edited), which
    made every postmap after a fresh write take 0.7 s.
    """
    path.write_text(text, encoding="utf-8")
    past = time.time() - 5
    os.utime(path, (past, past))


def run(
    cmd: list[str], timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class Reaped:
    """A daemonizing server's start command, run under reaper.py."""

    def __init__(self, name: str, command: list[str], workdir: Path) -> None:
        self.name = name
        self.status = workdir / f"{name}.started"
        self.status.unlink(missing_ok=True)
        self.output = (workdir / f"{name}.reaper.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(REAPER), str(self.status), *command],
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C in the terminal is ours to handle, not theirs
        )

    def started(self, timeout: float, log: Callable[[], str]) -> None:
        """Wait for the start command itself to finish; fail with its log."""
        try:
            wait_until(
                lambda: self.status.exists() or self.proc.poll() is not None,
                timeout,
                f"{self.name} to start",
            )
            code = int(self.status.read_text()) if self.status.exists() else -1
        except AssertionError:
            code = -2
        if code != 0:
            self.kill()
            raise RuntimeError(f"{self.name} failed to start (exit {code}):\n{log()[-4000:]}")

    def wait_gone(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """Last resort: the reaper SIGKILLs every process of the server."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.output.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        else:
            self.output.close()


# -- Dovecot -------------------------------------------------------------------


class Dovecot:
    """IMAP for the tests to read, LMTP for Postfix to deliver into."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.imap_port, self.lmtp_port = free_ports(2)
        account = pwd.getpwnam(MAIL_USER)
        self.uid, self.gid = account.pw_uid, account.pw_gid
        self.config = root / "dovecot.conf"
        self.log = root / "dovecot.log"
        self.reaped: Reaped | None = None

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, self.uid, self.gid)
        users = "".join(f"{u.lower()}:{{PLAIN}}{PASSWORD}::::::\n" for u in USERS)
        (self.root / "users").write_text(users, encoding="utf-8")
        (self.root / "users").chmod(0o644)  # read by the auth process (user dovecot)
        self.config.write_text(
            fill(
                "dovecot.conf",
                ROOT=self.root,
                INSTANCE=f"iqmaild-e2e-{os.getpid()}",
                UID=self.uid,
                GID=self.gid,
                IMAP_PORT=self.imap_port,
                LMTP_PORT=self.lmtp_port,
            ),
            encoding="utf-8",
        )

    def start(self) -> None:
        self.write_config()
        self.reaped = Reaped("dovecot", [DOVECOT, "-c", str(self.config)], self.root)
        self.reaped.started(30, self.log_text)
        wait_until(
            lambda: port_open(self.imap_port) and port_open(self.lmtp_port), 15, "Dovecot ports"
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no dovecot.log)"

    def stop(self) -> None:
        if self.reaped is None:
            return
        if self.reaped.proc.poll() is None:
            subprocess.run(
                [DOVEADM, "-c", str(self.config), "stop"], capture_output=True, timeout=30
            )
            if not self.reaped.wait_gone(15):
                self.reaped.kill()
        self.reaped.close()
        self.reaped = None


# -- Postfix -------------------------------------------------------------------


@dataclass
class Postfix:
    """A private Postfix instance: the desk's MX and the daemon's relay."""

    root: Path
    dovecot_lmtp_port: int
    daemon_port: int
    daemon_protocol: str = "smtp"  # the transport Postfix uses to hand mail to the daemon
    message_size_limit: int = 10_240_000
    mx_port: int = 0
    outbound_port: int = 0
    outbound_enabled: bool = True
    reaped: Reaped | None = None
    # Desk-domain addresses Postfix accepts besides the desk and the staff.
    extra_recipients: list[str] = field(default_factory=list)
    # Shapes of failure for mail the daemon sends: addresses its relay refuses at
    # RCPT (550 5.1.1), extra transport entries (``error:``, ``retry:``), and
    # Postfix's delay_warning_time ("0h": no delay warnings, Postfix's default).
    refused_at_rcpt: list[str] = field(default_factory=list)
    transports: dict[str, str] = field(default_factory=dict)
    delay_warning_time: str = "0h"
    # main.cf parameters appended after the template's (the last definition wins):
    # the README's counter-examples, e.g. the desk domain in mydestination.
    main_overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mx_port, self.outbound_port = free_ports(2)
        self.config_dir = self.root / "etc"
        self.maillog = self.root / "maillog"

    # -- configuration ---------------------------------------------------------
    @property
    def daemon_nexthop(self) -> str:
        if self.daemon_protocol == "lmtp":
            return f"lmtp:inet:127.0.0.1:{self.daemon_port}"
        return f"smtp:[127.0.0.1]:{self.daemon_port}"

    def transport_entries(self) -> dict[str, str]:
        dovecot = f"lmtp:inet:127.0.0.1:{self.dovecot_lmtp_port}"
        entries = {
            **self.transports,
            # The desk address goes to the daemon (README: "Hand the desk's mail
            # to the daemon"); user+ext@ finds this entry too.
            DESK: self.daemon_nexthop,
            # The rest of the desk domain (the staff mailbox) lives in Dovecot.
            "desk.test": dovecot,
        }
        # Everything else stands in for the Internet: customers' own mail
        # servers are this Dovecot too.
        entries["*"] = dovecot
        return entries

    def write_config(self) -> None:
        for sub in ("etc", "spool", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        write_config_file(
            self.config_dir / "main.cf",
            fill(
                "postfix-main.cf",
                ROOT=self.root,
                CONFIG_DIR=self.config_dir,
                MESSAGE_SIZE_LIMIT=self.message_size_limit,
                DELAY_WARNING_TIME=self.delay_warning_time,
            )
            + "".join(f"{k} = {v}\n" for k, v in self.main_overrides.items()),
        )
        self.write_master()
        self.write_transport()
        write_config_file(
            self.config_dir / "relay_recipients",
            "".join(f"{u} OK\n" for u in (DESK, STAFF, *self.extra_recipients)),
        )
        run([POSTMAP, "-c", str(self.config_dir), f"hash:{self.config_dir}/relay_recipients"])
        write_config_file(
            self.config_dir / "outbound_refused",
            "".join(
                f"{a} 550 5.1.1 <{a}>: Recipient address rejected: User unknown\n"
                for a in self.refused_at_rcpt
            ),
        )
        run([POSTMAP, "-c", str(self.config_dir), f"hash:{self.config_dir}/outbound_refused"])

    def write_master(self) -> None:
        write_config_file(
            self.config_dir / "master.cf",
            fill(
                "postfix-master.cf",
                MX_PORT=self.mx_port,
                OUTBOUND_PORT=self.outbound_port,
                OUTBOUND="" if self.outbound_enabled else "#",
            ),
        )

    def write_transport(self) -> None:
        lines = "".join(f"{k} {v}\n" for k, v in self.transport_entries().items())
        write_config_file(self.config_dir / "transport", lines)
        run([POSTMAP, "-c", str(self.config_dir), f"hash:{self.config_dir}/transport"])

    # -- running ---------------------------------------------------------------
    def start(self) -> None:
        self.write_config()
        self.reaped = Reaped("postfix", [POSTFIX, "-c", str(self.config_dir), "start"], self.root)
        self.reaped.started(60, self.log_text)
        wait_until(lambda: port_open(self.mx_port), 15, "Postfix's MX port")
        if self.outbound_enabled:
            wait_until(lambda: port_open(self.outbound_port), 15, "Postfix's outbound port")

    def reload(self) -> None:
        run([POSTFIX, "-c", str(self.config_dir), "reload"])

    def set_outbound(self, enabled: bool) -> None:
        """Open or close the daemon's relay port (master.cf + postfix reload)."""
        self.outbound_enabled = enabled
        self.write_master()
        self.reload()
        wait_until(
            lambda: port_open(self.outbound_port) == enabled,
            15,
            f"outbound port {'open' if enabled else 'closed'}",
        )

    def stop(self) -> None:
        if self.reaped is None:
            return
        if self.reaped.proc.poll() is None:
            subprocess.run(
                [POSTFIX, "-c", str(self.config_dir), "stop"], capture_output=True, timeout=30
            )
            if not self.reaped.wait_gone(15):
                self.reaped.kill()
        self.reaped.close()
        self.reaped = None

    # -- looking ---------------------------------------------------------------
    def log_text(self) -> str:
        if not self.maillog.exists():
            return "(no maillog)"
        return self.maillog.read_text(encoding="utf-8", errors="replace")

    def queue(self) -> list[dict[str, Any]]:
        """The queue as `postqueue -j` sees it (one JSON object per message)."""
        out = run([POSTQUEUE, "-c", str(self.config_dir), "-j"]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        run([POSTQUEUE, "-c", str(self.config_dir), "-f"])

    def deliveries(self, nexthop_port: int | None = None) -> list[dict[str, str]]:
        """Delivery attempts from the log: queue id, recipient, relay, status, text."""
        message_ids: dict[str, str] = {}
        out = []
        for line in self.log_text().splitlines():
            m = re.search(r"\]: ([0-9A-F]{6,}): message-id=(\S*)", line)
            if m:
                message_ids[m.group(1)] = m.group(2).strip("<>")
                continue
            m = re.search(
                r"\]: ([0-9A-F]{6,}): to=<([^>]*)>.*? relay=(\S+),.*? status=(\w+) (.*)$", line
            )
            if m:
                qid, rcpt, relay, status, text = m.groups()
                if nexthop_port is not None and not relay.endswith(f"]:{nexthop_port}"):
                    continue
                out.append(
                    {
                        "queue_id": qid,
                        "to": rcpt,
                        "relay": relay,
                        "status": status,
                        "text": text,
                        "message_id": message_ids.get(qid, ""),
                    }
                )
        return out


# -- The daemon ----------------------------------------------------------------


def iqmaild_command() -> list[str]:
    """The console script of the interpreter running the tests (`pip install -e`)."""
    script = Path(sysconfig.get_path("scripts")) / "iqmaild"
    if script.exists():
        return [str(script)]
    found = shutil.which("iqmaild", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "iqmaild"]


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the test run dies, so no daemon outlives it."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class DeskDaemon:
    """`iqmaild serve` as a real process, with its CLI for looking inside."""

    def __init__(
        self,
        root: Path,
        relay_port: int,
        protocol: str = "smtp",
        directory: dict[str, Any] | None = None,
        template: Path | None = None,
        **sections: dict[str, Any],
    ) -> None:
        """Write the config, then migrate and import the directory.

        ``template`` is a database that `iqmaild migrate` and `iqmaild directory
        import` already made with the default directory: copying it saves two
        CLI runs (about a second) per test.
        """
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.smtp_port, self.http_port = free_ports(2)
        self.db_path = root / "iqmaild.db"
        self.config = root / "iqmaild.toml"
        self.log = root / "serve.log"
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        data = config_dict(
            f"sqlite+aiosqlite:///{self.db_path}",
            relay_port,
            smtp={
                "listen": f"127.0.0.1:{self.smtp_port}",
                "protocol": protocol,
                # Postfix's own limit is larger: what the daemon refuses, it
                # refuses itself (the size tests rely on the difference).
                "max_message_size": 5 * 1024 * 1024,
            },
            http={"listen": f"127.0.0.1:{self.http_port}", "public_url": self.base_url},
            outbound={
                # Retries within seconds, for as long as the fault tests need.
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 1.0,
                "connect_timeout": 5.0,
            },
            logging={"level": "info"},
            processing={"max_attempts": 3, "retry_seconds": 0.5},
        )
        for name, values in sections.items():
            section = data.setdefault(name, {})
            for key, value in values.items():
                if isinstance(value, dict):
                    section.setdefault(key, {}).update(value)
                else:
                    section[key] = value
        self.settings = data
        self.config.write_text(to_toml(data), encoding="utf-8")
        if template is not None and directory is None:
            shutil.copyfile(template, self.db_path)
        else:
            directory_file = root / "directory.json"
            directory_file.write_text(json.dumps(directory or DIRECTORY), encoding="utf-8")
            self.cli("migrate", as_json=False)
            self.cli("directory", "import", str(directory_file), as_json=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_handle = None

    def set_relay(self, port: int) -> None:
        self.settings["outbound"]["relay"] = f"127.0.0.1:{port}"
        self.config.write_text(to_toml(self.settings), encoding="utf-8")

    def cli(self, *args: str, as_json: bool = True, check: bool = True) -> Any:
        cmd = [*iqmaild_command(), "--config", str(self.config), *args]
        if as_json:
            cmd.append("--json")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return json.loads(proc.stdout) if as_json else proc.stdout

    def ticket(self, number: int) -> dict[str, Any]:
        return self.cli("ticket", "show", str(number))  # type: ignore[no-any-return]

    def tickets(self) -> list[dict[str, Any]]:
        return self.cli("ticket", "list")  # type: ignore[no-any-return]

    def messages(self) -> list[dict[str, Any]]:
        return self.cli("message", "list", "--limit", "100000")  # type: ignore[no-any-return]

    def outbox(self) -> list[dict[str, Any]]:
        return self.cli("outbox", "list", "--limit", "100000")  # type: ignore[no-any-return]

    # -- running ---------------------------------------------------------------
    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        if self.log_handle is not None:
            self.log_handle.close()
        self.log_handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*iqmaild_command(), "--config", str(self.config), "serve"],
            stdout=self.log_handle,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=_stop_with_parent,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"iqmaild serve exited {self.proc.returncode}:\n{self.log_tail()}"
                )
            if not port_open(self.smtp_port):
                return False
            try:
                with urllib.request.urlopen(self.base_url + "/healthz", timeout=1) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_until(ready, 30, "iqmaild serve to listen")

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM, as systemd does); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self.log_handle is not None:
            self.log_handle.close()
            self.log_handle = None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines (optionally one event)."""
        out = []
        if not self.log.exists():
            return out
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and (name is None or item.get("event") == name):
                out.append(item)
        return out
