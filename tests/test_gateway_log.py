"""What the picker's log says: grpc.aio's traceback for a reply to a stream its client had just cancelled is
dropped (a race with a departing client, not a fault); every other error still shows."""

from __future__ import annotations

import logging

import pytest

from extproc.gateway.app import LateReplyFilter
from extproc.gateway.telemetry import Telemetry


def test_a_reply_to_a_cancelled_stream_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    late = LateReplyFilter()
    late.telemetry = telemetry = Telemetry()
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    grpc_log.addFilter(late)
    try:
        with caplog.at_level(logging.INFO):
            try:
                raise RuntimeError("Failed execute_batch")
            except RuntimeError:
                grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]", "/ext_proc/Process")
            grpc_log.error("Unexpected error in the servicer")
    finally:
        grpc_log.removeFilter(late)
    assert late.dropped == 1
    assert telemetry.registry.get_sample_value("extproc_late_replies_total") == 1
    assert [r.getMessage() for r in caplog.records] == ["Unexpected error in the servicer"]
