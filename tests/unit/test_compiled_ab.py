"""bench/compiled_ab.py builds what its SPEC names and reads every figure its micro benches
print; bench/interp_share.py counts a sample as a module's own only when the interpreter,
not a C library below it, was running."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import compiled_ab, interp_share

ROOT = Path(__file__).parents[2]


def test_a_spec_names_groups_and_files_each_once_in_order() -> None:
    chosen = compiled_ab.modules("shipped,l4,agent/adapters/relay.py,agent/core/headers.py")
    assert chosen[: len(compiled_ab.shipped())] == compiled_ab.shipped()
    assert chosen.count("agent/adapters/relay.py") == 1
    assert chosen[-1] == "agent/core/headers.py"
    assert compiled_ab.modules("pure") == ()
    assert compiled_ab.modules("shipped") == compiled_ab.shipped()  # pyproject's list
    assert set(compiled_ab.PROPOSED) <= set(compiled_ab.H2_MODULES)


def test_a_spec_naming_nothing_known_is_refused_with_the_groups() -> None:
    with pytest.raises(SystemExit, match=r"neither a group .*shipped.*nor a \.py file"):
        compiled_ab.modules("shipped,relay")


def test_every_micro_figure_is_read_with_its_label() -> None:
    printed = (
        "OpenSSL 3.0.19 1 Sep 2026\n"
        "outbound          28.2 us/request (best of 3 x 5000)\n"
        "inbound logged    16.1 us/request (best of 3 x 5000)\n"
        "accept   13.70 us/connection (best of 3)\n"
        "loopback full     agent both sides   2035 us/connection (best of 2)\n"
    )
    found = {
        " ".join(m["label"].split()): float(m["value"])
        for m in compiled_ab._FIGURE.finditer(printed)
    }
    assert found == {
        "outbound": 28.2,
        "inbound logged": 16.1,
        "accept": 13.7,
        "loopback full agent both sides": 2035.0,
    }


def test_a_sample_is_a_modules_own_only_while_the_interpreter_runs_below_it() -> None:
    loop = "uv_run (core.c:464);run_forever (loop.c:33397)"
    relay = "Side.data_received (agent/adapters/relay.py:97)"
    raw = "\n".join(
        [
            f"{loop};{relay};_PyEval_EvalFrameDefault (libpython3.11.so.1.0) 3",
            f"{loop};{relay} 2",  # the frame itself: its bytecode
            f"{loop};{relay};UVStream_write (loop.c:110085);write (libc.so.6) 5",
            f"{loop};Decoder.decode (hpack/hpack.py:500) 4",
            f"{loop};epoll_pwait (libc.so.6) 6",
        ]
    )
    total, mine = interp_share.shares(raw + "\n")
    assert total == 20
    assert mine == {"agent/adapters/relay.py": 5, "C": 11, "other python": 4}


def test_no_agent_class_subclasses_a_class_the_shipped_or_proposed_list_compiles() -> None:
    assert compiled_ab.python_subclasses(compiled_ab.modules("shipped,proposed"), ["agent"]) == []


def test_a_python_subclass_of_a_compiled_class_is_found() -> None:
    found = compiled_ab.python_subclasses(("agent/adapters/inbound_h2.py",), ["agent"])
    source = (ROOT / "agent/adapters/inbound_h2h1.py").read_text().splitlines()
    line = source.index("class InboundH2ToHttp1(InboundH2):") + 1
    assert found == [
        f"agent/adapters/inbound_h2h1.py:{line}: InboundH2ToHttp1 subclasses "
        "agent.adapters.inbound_h2.InboundH2"
    ]
