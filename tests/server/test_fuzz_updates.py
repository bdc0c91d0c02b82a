"""Fuzz: 10,000+ malformed client replies through the coordinator's decoder and validator.

Every case starts from a valid reply (dense fp32 B tensors, or an edge seed/scalar upload)
and breaks it in one or several ways a broken or hostile client could: keys missing, unknown
or renamed; shapes, dtypes and serialisations wrong; payload bytes truncated, padded or
flipped; NaN/Inf; an update beyond the norm bound; metrics with text, NaN, unknown names or
a bad example count; seed/scalar uploads with a stale round, a wrong layout, mismatched
lengths, duplicate seeds, NaN or huge scalars; and both kinds packed into one array
(:mod:`protocols.packing`, as clients send them) with wrong contents or a malformed packing:
cut, padded, flipped index bytes, a lying index length, unknown dtypes, bad shapes,
duplicate or extra entries, non-JSON, a bad prefix, a second array beside it. Each must be
refused with :class:`InvalidUpdate` — zero crashes, zero accepted — and the strategy's
global adapter must be untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from protocols import keys
from protocols.adapter_spec import AdapterSpec
from protocols.codecs import ClientUpdate, RoundContext, to_record
from protocols.errors import InvalidUpdate
from protocols.packing import PACKED_KEY, pack_record
from protocols.seed_updates import SeedScalarCodec, SeedUpdate, layout_id, trainable_shapes
from server.strategy import AdapterFedAvg

A1, B1 = "m.l0.q_proj.lora_A.weight", "m.l0.q_proj.lora_B.weight"
A2, B2 = "m.l0.v_proj.lora_A.weight", "m.l0.v_proj.lora_B.weight"
CASES = 10_500


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {A1: rng.normal(size=(4, 8)).astype(np.float32), B1: np.zeros((8, 4), np.float32),
            A2: rng.normal(size=(4, 8)).astype(np.float32), B2: np.zeros((6, 4), np.float32)}


def _strategy() -> AdapterFedAvg:
    glob = _global()
    spec = AdapterSpec.from_arrays(glob, {}, frozen=frozenset({A1, A2}))
    strategy = AdapterFedAvg(spec, max_update_norm=50.0)
    strategy.begin_round(3, to_record(glob), ConfigRecord({
        keys.EDGE_LEARNING_RATE: 0.1, keys.EDGE_LOCAL_STEPS: 8, keys.EDGE_CODEC: "seed-scalar"}))
    return strategy


def _reply(arrays: ArrayRecord, metrics: MetricRecord, extra: dict | None = None) -> Message:
    request = Message(RecordDict(), dst_node_id=7, message_type="train")
    content = RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics, **(extra or {})})
    return Message(content, reply_to=request)


def _raw(arr: np.ndarray, *, dtype: str | None = None, shape: list[int] | None = None,
         stype: str = "numpy.ndarray", data: bytes | None = None) -> Array:
    good = Array(np.ascontiguousarray(arr))
    return Array(dtype=dtype or good.dtype,
                 shape=tuple(shape) if shape is not None else good.shape,
                 stype=stype, data=good.data if data is None else data)


def _dense(rng: np.random.Generator) -> dict[str, Array]:
    return {B1: Array(rng.normal(size=(8, 4)).astype(np.float32)),
            B2: Array(rng.normal(size=(6, 4)).astype(np.float32))}


def _seed_arrays(rng: np.random.Generator, spec: AdapterSpec, **over: object) -> dict[str, Array]:
    n = int(over.pop("n", 4))
    update = SeedUpdate(
        base_round=int(over.pop("base_round", 3)),
        seeds=np.asarray(over.pop("seeds", rng.choice(2**40, size=n, replace=False)),
                         dtype=np.uint64),
        scalars=np.asarray(over.pop("scalars", rng.normal(size=n)), dtype=np.float32),
        layout=int(over.pop("layout", layout_id(trainable_shapes(spec)))),
    )
    record = SeedScalarCodec().encode(ClientUpdate({}, update), RoundContext({}))
    return dict(record.items())


def _metrics(rng: np.random.Generator) -> dict[str, object]:
    return {keys.NUM_EXAMPLES: int(rng.integers(1, 100)), keys.TRAIN_LOSS: float(rng.random())}


def _mutations(spec: AdapterSpec) -> list[Callable[[np.random.Generator], Message]]:
    def dense_with(change: Callable[[dict[str, Array], np.random.Generator], None]
                   ) -> Callable[[np.random.Generator], Message]:
        def make(rng: np.random.Generator) -> Message:
            arrays = _dense(rng)
            change(arrays, rng)
            return _reply(ArrayRecord(arrays), MetricRecord(_metrics(rng)))
        return make

    def metrics_with(change: Callable[[dict[str, object], np.random.Generator], None]
                     ) -> Callable[[np.random.Generator], Message]:
        def make(rng: np.random.Generator) -> Message:
            metrics = _metrics(rng)
            change(metrics, rng)
            return _reply(ArrayRecord(_dense(rng)), MetricRecord(metrics))  # type: ignore[arg-type]
        return make

    def seed_with(**over: Callable[[np.random.Generator], object]
                  ) -> Callable[[np.random.Generator], Message]:
        def make(rng: np.random.Generator) -> Message:
            values = {k: f(rng) for k, f in over.items()}
            return _reply(ArrayRecord(_seed_arrays(rng, spec, **values)),
                          MetricRecord(_metrics(rng)))
        return make

    def seed_raw(change: Callable[[dict[str, Array], np.random.Generator], None]
                 ) -> Callable[[np.random.Generator], Message]:
        def make(rng: np.random.Generator) -> Message:
            arrays = _seed_arrays(rng, spec)
            change(arrays, rng)
            return _reply(ArrayRecord(arrays), MetricRecord(_metrics(rng)))
        return make

    def pick(arrays: dict[str, Array], rng: np.random.Generator) -> str:
        return sorted(arrays)[int(rng.integers(len(arrays)))]

    def nan(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        value = arrays[key].numpy().copy()
        value.flat[int(rng.integers(value.size))] = rng.choice([np.nan, np.inf, -np.inf])
        arrays[key] = Array(value)

    def truncate(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        data = arrays[key].data
        arrays[key] = _raw(arrays[key].numpy(), data=data[: int(rng.integers(0, len(data)))])

    def pad(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        arrays[key] = _raw(arrays[key].numpy(),
                           data=arrays[key].data + rng.bytes(int(rng.integers(1, 64))))

    def flip_header(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        data = bytearray(arrays[key].data)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, min(len(data), 128)))] ^= int(rng.integers(1, 256))
        arrays[key] = _raw(arrays[key].numpy(), data=bytes(data))

    def garbage(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        arrays[key] = _raw(arrays[key].numpy(), data=rng.bytes(int(rng.integers(0, 600))))

    def reshape(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        value = arrays[key].numpy()
        arrays[key] = Array(rng.normal(size=(value.size + int(rng.integers(1, 5)),))
                            .astype(np.float32))

    def transpose(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        arrays[B1] = Array(np.ascontiguousarray(arrays[B1].numpy().T))

    def retype(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        value = arrays[key].numpy()
        dtype = rng.choice([d for d in ("float64", "float16", "float32", "int32", "int64",
                                        "uint64", "uint8", ">f4", ">u8", "complex64")
                            if np.dtype(d) != value.dtype])
        with np.errstate(over="ignore", invalid="ignore"):
            arrays[key] = Array(value.astype(dtype))

    def header_lies(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        shape = [int(x) for x in rng.integers(0, 2**31, size=int(rng.integers(0, 4)))]
        arrays[key] = _raw(arrays[key].numpy(), shape=shape,
                           dtype=str(rng.choice(["float32", "float64", "bogus"])))

    def stype(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)
        arrays[key] = _raw(arrays[key].numpy(), stype=str(rng.choice(["torch", "", "pickle"])))

    def drop(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        del arrays[pick(arrays, rng)]

    def unknown(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        arrays[f"m.l{int(rng.integers(9))}.x.lora_B.weight"] = Array(
            rng.normal(size=(2, 2)).astype(np.float32))

    def frozen_too(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        arrays[A1] = Array(rng.normal(size=(4, 8)).astype(np.float32))  # FFA: A never sent

    def far(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        key = pick(arrays, rng)  # finite, right shape and dtype, but beyond the norm bound
        arrays[key] = Array((arrays[key].numpy() * 0 + float(rng.choice([-1, 1])) * 1e3
                             ).astype(np.float32))

    def huge(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        arrays[pick(arrays, rng)] = Array(np.zeros((512, 512), np.float32))  # oversized

    def several(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        for f in rng.choice([retype, drop, unknown, reshape], size=2, replace=False):
            if arrays:
                f(arrays, rng)
        if not arrays:
            unknown(arrays, rng)
        truncate(arrays, rng)  # last: it leaves a payload nothing else can read

    def bad_count(m: dict[str, object], rng: np.random.Generator) -> None:
        m[keys.NUM_EXAMPLES] = rng.choice([0, -5, 1.5, float("nan")]).item()

    def no_count(m: dict[str, object], rng: np.random.Generator) -> None:
        del m[keys.NUM_EXAMPLES]

    def text_metric(m: dict[str, object], rng: np.random.Generator) -> None:
        m["sample-text"] = 1.0  # a side channel is refused by name, whatever its value

    def nan_metric(m: dict[str, object], rng: np.random.Generator) -> None:
        m[keys.TRAIN_LOSS] = float(rng.choice([np.nan, np.inf]))

    def list_metric(m: dict[str, object], rng: np.random.Generator) -> None:
        m[keys.TRAIN_LOSS] = [1.0, 2.0]

    def rank_claim(m: dict[str, object], rng: np.random.Generator) -> None:
        # a rank the upload's shapes do not have, or none a device could have
        m[keys.LORA_RANK] = rng.choice([0, 1, 2, 3, 5, 1.5, -1, 2**40]).item()

    def seeds_at_a_claimed_rank(rng: np.random.Generator) -> Message:
        metrics = {**_metrics(rng), keys.LORA_RANK: int(rng.integers(1, 4))}
        return _reply(ArrayRecord(_seed_arrays(rng, spec)), MetricRecord(metrics))

    def extra_record(rng: np.random.Generator) -> Message:
        return _reply(ArrayRecord(_dense(rng)), MetricRecord(_metrics(rng)),
                      {"leak": ConfigRecord({"text": "to be or not to be"})})

    def no_arrays(rng: np.random.Generator) -> Message:
        request = Message(RecordDict(), dst_node_id=7, message_type="train")
        return Message(RecordDict({keys.METRICS: MetricRecord(_metrics(rng))}),
                       reply_to=request)

    def seeds_trunc(arrays: dict[str, Array], rng: np.random.Generator) -> None:
        arrays[keys.SEEDS] = Array(arrays[keys.SEEDS].numpy()[:-1].copy())

    def packed(make_arrays: Callable[[np.random.Generator], dict[str, Array]],
               change: Callable[[dict[str, Array], np.random.Generator], None]
               ) -> Callable[[np.random.Generator], Message]:
        """A well-formed packed record of wrong contents: the unpacked checks must hold."""
        def make(rng: np.random.Generator) -> Message:
            arrays = make_arrays(rng)
            change(arrays, rng)
            return _reply(pack_record(ArrayRecord(arrays)), MetricRecord(_metrics(rng)))
        make.__qualname__ = f"packed.{change.__name__}"
        return make

    def packed_bytes(make_arrays: Callable[[np.random.Generator], dict[str, Array]],
                     change: Callable[[bytearray, np.random.Generator], ArrayRecord]
                     ) -> Callable[[np.random.Generator], Message]:
        """Valid contents, a malformed packing."""
        def make(rng: np.random.Generator) -> Message:
            record = pack_record(ArrayRecord(make_arrays(rng)))
            blob = bytearray(record[PACKED_KEY].numpy().tobytes())
            return _reply(change(blob, rng), MetricRecord(_metrics(rng)))
        make.__qualname__ = f"packed_bytes.{change.__name__}"
        return make

    def seeds(rng: np.random.Generator) -> dict[str, Array]:
        return _seed_arrays(rng, spec)

    def as_record(blob: bytes | bytearray) -> ArrayRecord:
        return ArrayRecord({PACKED_KEY: Array(np.frombuffer(bytes(blob), dtype=np.uint8))})

    def split(blob: bytearray) -> tuple[list[dict[str, object]], bytes]:
        length = int.from_bytes(blob[8:12], "little")
        return json.loads(blob[12:12 + length]), bytes(blob[12 + length:])

    def rebuilt(index: object, payload: bytes) -> ArrayRecord:
        header = json.dumps(index).encode()
        return as_record(b"FTPK\x01\0\0\0" + len(header).to_bytes(4, "little") + header
                         + payload)

    def cut(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        return as_record(blob[: int(rng.integers(0, len(blob)))])

    def padded(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        return as_record(blob + rng.bytes(int(rng.integers(1, 64))))

    def flip_index(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        end = 12 + int.from_bytes(blob[8:12], "little")
        for _ in range(int(rng.integers(1, 4))):
            blob[int(rng.integers(0, end))] ^= int(rng.integers(1, 256))
        return as_record(blob)

    def index_length_lies(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        length = int.from_bytes(blob[8:12], "little")
        wrong = int(rng.choice([0, length - 1, length + 1, len(blob), 2**32 - 1]))
        blob[8:12] = wrong.to_bytes(4, "little")
        return as_record(blob)

    def bad_dtype(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        index, payload = split(blob)
        index[int(rng.integers(len(index)))]["dtype"] = str(
            rng.choice([">f4", "|O", "<c8", "float32", "<U1", "<f4 ", ""]))
        return rebuilt(index, payload)

    def bad_shape(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        index, payload = split(blob)
        shapes: list[object] = [[-1, 4], [1.5, 4], [True, 4], "8,4", [2**50, 2**50], [1] * 9,
                                [8, 4, 1, 1, 1, 1, 1, 1, 2], None]
        index[int(rng.integers(len(index)))]["shape"] = shapes[int(rng.integers(len(shapes)))]
        return rebuilt(index, payload)

    def bad_entry(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        index, payload = split(blob)
        entry = index[int(rng.integers(len(index)))]
        choice = int(rng.integers(5))
        if choice == 0:
            index.append(dict(entry))  # the same name twice
        elif choice == 1:
            entry["extra"] = 1
        elif choice == 2:
            entry["name"] = str(rng.choice(["", PACKED_KEY]))
        elif choice == 3:
            del entry["dtype"]
        else:
            return rebuilt({"tensors": index}, payload)
        return rebuilt(index, payload)

    def not_json(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        _, payload = split(blob)
        header = bytes(rng.choice([b"\xff\xfe", b"[{", b"nul", b"\x00"]))
        return as_record(b"FTPK\x01\0\0\0" + len(header).to_bytes(4, "little") + header
                         + payload)

    def bad_prefix(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        position = int(rng.integers(0, 8))
        blob[position] ^= int(rng.integers(1, 256))
        return as_record(blob)

    def outer(blob: bytearray, rng: np.random.Generator) -> ArrayRecord:
        if rng.random() < 0.5:  # the packed bytes beside a second array
            record = as_record(blob)
            record[B1] = Array(np.zeros((8, 4), np.float32))
            return record
        usable = len(blob) // 4 * 4
        return ArrayRecord({PACKED_KEY: Array(np.frombuffer(bytes(blob[:usable]), "<f4"))})

    packing_cases = [cut, padded, flip_index, index_length_lies, bad_dtype, bad_shape,
                     bad_entry, not_json, bad_prefix, outer]
    return [
        *(packed_bytes(make_arrays, change) for change in packing_cases
          for make_arrays in (_dense, seeds)),
        *(packed(_dense, change) for change in (nan, reshape, transpose, drop, unknown,
                                                frozen_too, far, huge)),
        packed(seeds, seeds_trunc),
        dense_with(nan), dense_with(truncate), dense_with(pad), dense_with(flip_header),
        dense_with(garbage), dense_with(reshape), dense_with(transpose), dense_with(retype),
        dense_with(header_lies), dense_with(stype), dense_with(drop), dense_with(unknown),
        dense_with(frozen_too), dense_with(huge), dense_with(far), dense_with(several),
        metrics_with(bad_count), metrics_with(no_count), metrics_with(text_metric),
        metrics_with(nan_metric), metrics_with(list_metric), metrics_with(rank_claim),
        seeds_at_a_claimed_rank, extra_record, no_arrays,
        seed_with(base_round=lambda r: int(r.choice([0, 1, 2, 4, 99]))),      # stale / future
        seed_with(layout=lambda r: int(r.integers(0, 2**62))),               # another adapter
        seed_with(n=lambda r: int(r.integers(9, 64))),                        # > max steps
        seed_with(n=lambda r: 0),
        seed_with(scalars=lambda r: np.array([1.0, np.nan, 2.0, 0.5])),
        seed_with(scalars=lambda r: np.array([1.0, 2e3, -1.0, 0.0]) * r.choice([1, -1])),
        seed_with(seeds=lambda r: np.array([5, 6, 5, 7])),                    # duplicate seed
        seed_raw(seeds_trunc), seed_raw(truncate), seed_raw(retype), seed_raw(garbage),
        seed_raw(flip_header), seed_raw(drop), seed_raw(unknown), seed_raw(header_lies),
    ]


def test_ten_thousand_malformed_updates_are_all_refused() -> None:
    strategy = _strategy()
    before = {k: v.copy() for k, v in strategy.current_global.items()}
    mutations = _mutations(strategy.spec)
    rng = np.random.default_rng(2026)
    refused, reasons = 0, set()
    for i in range(CASES):
        make = mutations[i % len(mutations)]
        msg = make(rng)
        try:
            strategy._check_reply(msg)
        except InvalidUpdate as bad:  # anything else propagates: a crash fails the test
            refused += 1
            reasons.add(bad.reason.split(":")[-1].strip()[:30])
            continue
        pytest.fail(f"case {i} ({make.__qualname__}) was accepted")
    assert refused == CASES
    assert len(reasons) > 30, "the cases exercise many distinct checks"
    for key, value in before.items():
        np.testing.assert_array_equal(strategy.current_global[key], value)
    # and the well-formed versions of both upload kinds are accepted (the fuzzer is sound)
    strategy._check_reply(_reply(ArrayRecord(_dense(rng)), MetricRecord(_metrics(rng))))
    strategy._check_reply(_reply(ArrayRecord(_seed_arrays(rng, strategy.spec)),
                                 MetricRecord(_metrics(rng))))
    strategy._check_reply(_reply(pack_record(ArrayRecord(_dense(rng))),
                                 MetricRecord(_metrics(rng))))
    strategy._check_reply(_reply(pack_record(ArrayRecord(_seed_arrays(rng, strategy.spec))),
                                 MetricRecord(_metrics(rng))))
