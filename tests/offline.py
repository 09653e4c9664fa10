"""A guard that makes any network connection of the process fail, for tests that must run offline."""

import socket

import pytest


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """socket.connect (and create_connection) raise; Hugging Face is told to stay offline."""

    def refuse(*args, **kwargs):
        raise NetworkBlocked(f"network access attempted during an offline test: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
