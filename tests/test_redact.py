"""URLs in logs: stream keys, passwords and query tokens never appear."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broadcaster.redact import MASK, redact_url

SECRET = "live_123456789_AbCdEfGhSeCrEt"


def test_twitch_stream_key_is_masked():
    assert redact_url(f"rtmp://live.twitch.tv/app/{SECRET}") == f"rtmp://live.twitch.tv/app/{MASK}"


def test_twitch_rtmps_ingest_keeps_scheme_host_and_port_and_masks_the_key():
    url = f"rtmps://ingest.global-contribute.live-video.net:443/app/{SECRET}"

    assert redact_url(url) == f"rtmps://ingest.global-contribute.live-video.net:443/app/{MASK}"


def test_youtube_stream_key_is_masked():
    url = "rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl-mnop-qrst"

    assert redact_url(url) == f"rtmp://a.rtmp.youtube.com/live2/{MASK}"


def test_youtube_backup_ingest_masks_key_and_query():
    url = "rtmps://b.rtmps.youtube.com:443/live2/abcd-efgh-ijkl?backup=1"

    assert redact_url(url) == f"rtmps://b.rtmps.youtube.com:443/live2/{MASK}?{MASK}"


def test_password_is_masked_and_the_user_kept():
    assert redact_url("rtmp://streamer:hunter2@ingest.example/live/key") == (
        f"rtmp://streamer:{MASK}@ingest.example/live/{MASK}"
    )


def test_password_containing_an_at_sign_is_masked_whole():
    redacted = redact_url("rtmp://streamer:p@ss@ingest.example/live/key")

    assert "p@ss" not in redacted and "ss@" not in redacted
    assert redacted.endswith(f"@ingest.example/live/{MASK}")


def test_username_without_password_is_masked_as_it_may_be_a_token():
    assert redact_url("https://tok3n@api.example/v1") == f"https://{MASK}@api.example/{MASK}"


def test_query_tokens_are_masked():
    redacted = redact_url(f"https://ingest.example/whip?token={SECRET}&room=1")

    assert SECRET not in redacted
    assert redacted == f"https://ingest.example/{MASK}?{MASK}"


def test_query_without_a_path_is_masked():
    assert redact_url(f"https://ingest.example?key={SECRET}") == f"https://ingest.example?{MASK}"


def test_fragment_is_dropped():
    assert redact_url(f"https://ingest.example/app/key#{SECRET}") == f"https://ingest.example/app/{MASK}"


def test_ipv6_host_keeps_its_brackets_and_port():
    assert redact_url(f"rtmp://[2001:db8::1]:1935/live/{SECRET}") == f"rtmp://[2001:db8::1]:1935/live/{MASK}"


def test_ipv6_loopback_without_port():
    assert redact_url(f"rtmp://[::1]/live/{SECRET}") == f"rtmp://[::1]/live/{MASK}"


@pytest.mark.parametrize("port", ["99999", "abc", "-1"])
def test_invalid_port_is_dropped_without_raising(port):
    assert redact_url(f"rtmp://ingest.example:{port}/live/{SECRET}") == f"rtmp://ingest.example/live/{MASK}"


def test_url_without_a_path_is_unchanged():
    assert redact_url("rtmp://ingest.example:1935") == "rtmp://ingest.example:1935"


def test_url_with_an_empty_path_segment_keeps_it():
    assert redact_url("rtmp://ingest.example/") == "rtmp://ingest.example/"


def test_stream_key_followed_by_a_trailing_slash_is_masked():
    assert SECRET not in redact_url(f"rtmp://live.twitch.tv/app/{SECRET}/")


@pytest.mark.parametrize("garbage", [
    "", SECRET, f"not a url {SECRET}", f"rtmp:{SECRET}", f"://{SECRET}", f"rtmp:///{SECRET}",
    f"rtmp://[::1/live/{SECRET}", f"rtmp://[zz]/live/{SECRET}", f"http://\u2100/{SECRET}",
    f"//{SECRET}", f"{SECRET}@host/app", "\x00\x01\x02", "rtmp://",
])
def test_garbage_is_masked_entirely(garbage):
    assert redact_url(garbage) == MASK


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text):
    assert isinstance(redact_url(text), str)


@settings(max_examples=200, deadline=None)
@given(st.text().filter(lambda t: "//" not in t))
def test_text_that_is_not_a_network_url_is_never_echoed(text):
    assert redact_url(text) == MASK


_URL_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~"
_secret = st.text(_URL_SAFE, min_size=8, max_size=40)
_hosts = st.sampled_from(["live.twitch.tv", "a.rtmp.youtube.com", "127.0.0.1", "[::1]", "[2001:db8::5]",
                          "ingest.example:1935", "ingest.example:443"])
_schemes = st.sampled_from(["rtmp", "rtmps", "http", "https", "srt"])
_app = st.sampled_from(["", "/app", "/live2", "/a/b/c"])


@settings(max_examples=200, deadline=None)
@given(_schemes, _hosts, _app, _secret)
def test_stream_key_as_last_path_segment_never_appears(scheme, host, app, secret):
    assume(secret not in f"{scheme}://user:{host}{app}")
    assert secret not in redact_url(f"{scheme}://{host}{app}/{secret}")


@settings(max_examples=200, deadline=None)
@given(_schemes, _hosts, _app, _secret)
def test_password_never_appears(scheme, host, app, secret):
    assume(secret not in f"{scheme}://user:{host}{app}")
    assert secret not in redact_url(f"{scheme}://user:{secret}@{host}{app}")


@settings(max_examples=200, deadline=None)
@given(_schemes, _hosts, _app, _secret)
def test_query_value_never_appears(scheme, host, app, secret):
    assume(secret not in f"{scheme}://user:{host}{app}")
    assert secret not in redact_url(f"{scheme}://{host}{app}?token={secret}&x=1")
