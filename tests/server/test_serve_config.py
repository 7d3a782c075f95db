"""`accord serve`'s configuration: keys file, token file, option checks; secrets
never echoed in error messages."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner

from accord.cli import app
from accord.server.run import ServeOptions, build, load_keys, load_tokens

runner = CliRunner()


def test_keys_file_maps_prefixes_to_keys(tmp_path: Path) -> None:
    a, b = secrets.token_bytes(32), secrets.token_bytes(16)
    (tmp_path / "b.secret").write_text(b.hex())
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({
        "http://pay.internal:8080": {"key_id": "pay", "secret": a.hex()},
        "http://stock.internal/tcc": {"key_id": "stock", "secret_file": "b.secret"},
    }))  # fmt: skip
    assert load_keys(path) == {
        "http://pay.internal:8080": ("pay", a),
        "http://stock.internal/tcc": ("stock", b),
    }


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        "{}",
        '{"http://x.test": {"secret": "SECRET"}}',
        '{"http://x.test": {"key_id": "k", "secret": "SECRET"}}',
        '{"http://x.test": {"key_id": "k", "secret": "abcd"}}',
    ],
)
def test_a_bad_keys_file_is_refused_without_echoing_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content.replace("SECRET", "5ec2e7" * 8 + "zz"))
    with pytest.raises(ValueError, match=str(path)) as refused:
        load_keys(path)
    assert "5ec2e7" not in str(refused.value)


def test_token_file_is_created_private_and_read(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "api-token"
    (token,) = load_tokens(path, create=True)
    assert len(token) >= 32
    assert path.stat().st_mode & 0o077 == 0
    assert load_tokens(path, create=True) == (token,)  # not replaced


def test_short_tokens_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# rotation\ntinytok\n")
    with pytest.raises(ValueError, match="at least 16") as refused:
        load_tokens(path, create=False)
    assert "tinytok" not in str(refused.value)


def test_the_allow_list_includes_the_keyed_prefixes(tmp_path: Path) -> None:
    options = ServeOptions(
        store_url="memory",
        keys={"http://pay.internal:8080": ("pay", secrets.token_bytes(16))},
        allow=("https://*.partner.test",),
        tokens=(secrets.token_hex(16),),
    )
    app_, _ = build(options)
    allow = app_.state.api.allow
    assert allow.check("http://pay.internal:8080/tcc") is None
    assert allow.check("https://a.partner.test/x") is None
    assert allow.check("http://pay.internal:8081/tcc") is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --data DIR or --store URL"),
        (["--data", "D", "--store", "sqlite:///x.db"], "give --data DIR or --store URL"),
        (["--store", "sqlite:///x.db"], "--token-file"),
        (["--data", "D", "--services-url", "http://127.0.0.1:1"], "go together"),
        (["--data", "D", "--port", "0"], "--port"),
        (["--store", "nosuch://x", "--no-auth"], "nosuch"),
        (["--data", "D", "--drain-timeout", "-1"], "drain_timeout_s must be between 0 and 3600"),
        (["--data", "D", "--drain-timeout", "1e9"], "drain_timeout_s must be between 0 and 3600"),
        (["--data", "D", "--allow", "ftp://files.test"], "'ftp://files.test' must be http(s)"),
        (["--data", "D", "--max-wait", "0"], "max_wait_s must be in (0, 3600]"),
        (["--data", "D", "--ca-file", "/nonexistent.pem"], "/nonexistent.pem: cannot read it"),
        (["--data", "D", "--ca-file", "NOTPEM"], "holds no PEM certificate"),
        (["--data", "D", "--client-cert", "NOTPEM"], "must hold a PEM private key"),
    ],
)
def test_serve_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    """A bad option, the server's own checks included: exit 2 with "error: ...", no traceback."""
    (tmp_path / "not.pem").write_text("just text\n")
    places = {"D": str(tmp_path / "d"), "NOTPEM": str(tmp_path / "not.pem")}
    args = [places.get(a, a) for a in args]
    r = runner.invoke(app, ["serve", *args])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output
    assert message in " ".join(r.output.split())
