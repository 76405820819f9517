"""The API's per-user limits (api.limits), without a server."""

from __future__ import annotations

import pytest

from nap_orch.api.limits import Limits, TokenBucket, TokenCache
from nap_orch.errors import Busy, TooManyRequests


def test_a_bucket_spends_its_burst_then_refills_at_its_rate():
    b = TokenBucket(rate=2, burst=3)
    assert [b.take(now=10.0) for _ in range(3)] == [0, 0, 0]
    assert b.take(now=10.0) == pytest.approx(0.5)  # a token comes every 0.5 s
    assert b.take(now=10.5) == 0
    assert b.take(now=10.5) > 0
    assert [b.take(now=100.0) for _ in range(4)][:3] == [0, 0, 0]  # full again, never above its burst


def test_the_request_rate_is_per_user_and_says_when_to_come_back():
    limits = Limits(rate=1, burst=2)
    limits.check_rate("alice", now=0)
    limits.check_rate("alice", now=0)
    with pytest.raises(TooManyRequests) as e:
        limits.check_rate("alice", now=0)
    assert e.value.status == 429 and e.value.retry_after == pytest.approx(1)
    limits.check_rate("bob", now=0)  # another user's bucket is full


def test_event_streams_are_counted_per_user_and_per_process_and_given_back():
    limits = Limits(streams_per_user=2, streams_total=3)
    with limits.stream("alice"), limits.stream("alice"):
        with pytest.raises(TooManyRequests), limits.stream("alice"):
            pass
        with limits.stream("bob"):
            with pytest.raises(Busy) as e, limits.stream("carol"):
                pass
            assert e.value.status == 503
    assert limits.streams == {}  # every place given back, the refused ones never taken
    with limits.stream("carol"):
        assert limits.streams == {"carol": 1}


def test_the_token_cache_remembers_good_and_bad_answers_for_its_ttl():
    cache = TokenCache(ttl=10, size=2)
    assert cache.get("d1", now=0) == (False, None)
    cache.put("d1", ("alice", False), now=0)
    cache.put("d2", None, now=0)
    assert cache.get("d1", now=9.9) == (True, ("alice", False))
    assert cache.get("d2", now=5) == (True, None)  # known to be bad
    assert cache.get("d1", now=10) == (False, None)  # expired: looked up again
    cache.put("d3", ("bob", True), now=0)  # full: the old entries go
    assert cache.get("d1", now=1) == (False, None) and cache.get("d3", now=1) == (True, ("bob", True))
    cache.forget("d3")
    assert cache.get("d3", now=1) == (False, None)
