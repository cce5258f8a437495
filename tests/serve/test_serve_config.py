"""ServeConfig validation and the `trident serve` limit flags (no server needed)."""

from __future__ import annotations

import pytest

from trident.cli import build_parser, serve_config
from trident.errors import TridentError
from trident.serve.config import DEFAULT_MAX_BODY_BYTES, ServeConfig


def test_defaults_are_open_but_bounded():
    config = ServeConfig()
    assert config.api_key is None and config.request_timeout_s is None and config.allowed_origins == ()
    assert config.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 1 << 20 and config.max_queued_requests >= 1


@pytest.mark.parametrize("kwargs", [
    {"api_key": ""}, {"api_key": " key"}, {"max_queued_requests": 0}, {"max_queued_requests": 1.5},
    {"max_queued_requests": True}, {"request_timeout_s": 0}, {"request_timeout_s": -1.0},
    {"request_timeout_s": float("inf")}, {"max_body_bytes": 0}, {"allowed_origins": "https://a.example"},
    {"allowed_origins": ("a.example",)}, {"allowed_origins": ("https://a.example/",)},
])
def test_bad_values_are_trident_errors(kwargs):
    with pytest.raises(TridentError):
        ServeConfig(**kwargs)


def test_origins_become_a_tuple():
    assert ServeConfig(allowed_origins=["https://a.example", "*"]).allowed_origins == ("https://a.example", "*")


def test_serve_flags():
    args = build_parser().parse_args([
        "serve", "--api-key", "k1", "--max-queued-requests", "4", "--request-timeout", "2.5",
        "--max-body-bytes", "1000", "--allowed-origin", "https://a.example", "--allowed-origin", "http://b:8080"])
    config = serve_config(args, environ={})
    assert config == ServeConfig(api_key="k1", max_queued_requests=4, request_timeout_s=2.5, max_body_bytes=1000,
                                 allowed_origins=("https://a.example", "http://b:8080"))


def test_api_key_from_environment_unless_given():
    parser = build_parser()
    assert serve_config(parser.parse_args(["serve"]), environ={"TRIDENT_API_KEY": "env-key"}).api_key == "env-key"
    assert serve_config(parser.parse_args(["serve", "--api-key", "flag"]),
                        environ={"TRIDENT_API_KEY": "env-key"}).api_key == "flag"
    assert serve_config(parser.parse_args(["serve"]), environ={}) == ServeConfig()
    with pytest.raises(TridentError):
        serve_config(parser.parse_args(["serve", "--request-timeout", "0"]), environ={})
