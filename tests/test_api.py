"""The public API's and the MCP server's pure parts: a cell's result from its IOPub messages,
what an agent is shown of it, the tools' schemas. The cluster tests (test_cluster_api.py,
test_cluster_mcp.py) run them against real kernels."""

from __future__ import annotations

import asyncio
import base64

from hpc_kernels.api import ResultBuilder
from hpc_kernels.mcp_server import (
    build_server,
    idle_timeout_for,
    result_blocks,
    tool_names,
)
from hpc_kernels.profiles import SCHEMA
from hpc_kernels.slurm import parse_queue_position

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def msg(kind: str, **content: object) -> dict[str, object]:
    return {"msg_type": kind, "content": content}


def test_a_result_is_assembled_from_the_cells_messages() -> None:
    b = ResultBuilder()
    b.add(msg("execute_input", code="x", execution_count=3))
    b.add(msg("stream", name="stdout", text="a\n"))
    b.add(msg("stream", name="stderr", text="warn\n"))
    b.add(msg("stream", name="stdout", text="b\n"))
    b.add(msg("display_data", data={"image/png": PNG, "text/plain": "<Image>"}, metadata={}))
    b.add(msg("execute_result", data={"text/plain": "42"}, metadata={}, execution_count=3))
    r = b.finish("ok", {"content": {"status": "ok", "execution_count": 3}})
    assert (r.status, r.stdout, r.stderr, r.result, r.execution_count, r.error) == ("ok", "a\nb\n", "warn\n", "42", 3,
                                                                                   None)
    assert [o["output_type"] for o in r.outputs] == ["display_data", "execute_result"]
    assert r.outputs[0]["data"]["image/png"] == PNG


def test_an_error_keeps_its_traceback_without_colours_and_the_reply_decides_the_status() -> None:
    b = ResultBuilder()
    b.add(msg("error", ename="ZeroDivisionError", evalue="division by zero",
              traceback=["\x1b[0;31mZeroDivisionError\x1b[0m", "division by zero"]))
    r = b.finish("ok", {"content": {"status": "error"}})
    assert r.status == "error" and not r.ok
    assert r.error is not None and r.error.ename == "ZeroDivisionError"
    assert r.error.traceback == "ZeroDivisionError\ndivision by zero"


def test_a_timeout_stays_a_timeout_whatever_the_interrupted_cell_replied() -> None:
    b = ResultBuilder()
    b.add(msg("error", ename="KeyboardInterrupt", evalue="", traceback=[]))
    assert b.finish("timeout", {"content": {"status": "error"}}).status == "timeout"
    assert b.finish("timeout", None).status == "timeout"


def test_displays_are_updated_and_cleared_in_place() -> None:
    b = ResultBuilder()
    b.add(msg("display_data", data={"text/plain": "1%"}, metadata={}, transient={"display_id": "p"}))
    b.add(msg("update_display_data", data={"text/plain": "100%"}, metadata={}, transient={"display_id": "p"}))
    assert [o["data"]["text/plain"] for o in b.finish("ok").outputs] == ["100%"]
    b.add(msg("stream", name="stdout", text="old"))
    b.add(msg("clear_output", wait=False))
    b.add(msg("stream", name="stdout", text="new"))
    r = b.finish("ok")
    assert r.stdout == "new" and r.outputs == []


def test_an_agent_gets_text_then_each_image_and_no_terminal_control() -> None:
    b = ResultBuilder()
    b.add(msg("stream", name="stdout", text="hi \x1b]52;c;cGF5bG9hZA==\x07there\n"))
    b.add(msg("display_data", data={"image/png": PNG + "\n", "text/plain": "<Figure>"}, metadata={}))
    b.add(msg("display_data", data={"text/plain": "a table"}, metadata={}))
    blocks = result_blocks(b.finish("ok", {"content": {"status": "ok"}}))
    assert [kind for kind, _, _ in blocks] == ["text", "image"]
    text = blocks[0][1]
    assert text.startswith("status: ok") and "hi there" in text and "\x1b" not in text and "a table" in text
    assert blocks[1] == ("image", PNG, "image/png")


def test_a_timeout_is_explained_to_the_agent() -> None:
    text = result_blocks(ResultBuilder().finish("timeout"))[0][1]
    assert "status: timeout" in text and "variables are kept" in text


def test_the_idle_timeout_of_an_agents_kernel() -> None:
    assert SCHEMA["kernel"]["mcp_idle_timeout"][1] == 3600.0
    assert idle_timeout_for(3600.0, None) == "3600"
    assert idle_timeout_for(3600.0, "10m") == "10m"
    assert idle_timeout_for(0.0, None) is None  # the profile's own limits.idle_timeout


def test_queue_position_is_the_place_among_the_partitions_pending_jobs() -> None:
    assert parse_queue_position("17\n12\n 30\n", "30") == 3
    assert parse_queue_position("17\n", "5") is None


def test_the_mcp_server_offers_every_tool_with_its_arguments() -> None:
    server = build_server()
    assert tool_names(server) == ["batch_results", "batch_status", "batch_submit", "execute", "interrupt",
                                  "list_kernels", "list_profiles", "logs", "restart", "shutdown", "start_kernel",
                                  "status"]
    tools = {t.name: t for t in asyncio.run(server.list_tools())}
    start = tools["start_kernel"].input_schema
    assert {"profile", "gpus", "python_env", "allow_hosts", "idle_timeout", "wait"} <= set(start["properties"])
    assert "ctx" not in start["properties"]
    assert tools["execute"].input_schema["required"] == ["name", "code"]
    assert all(t.description for t in tools.values())
