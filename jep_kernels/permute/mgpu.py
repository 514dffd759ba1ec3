"""Row gathers in Pallas Mosaic GPU (Hopper): DMA kernels that move token rows by index.

Both are persistent kernels, one program per multiprocessor, that walk a list of *units*: one
output row, or one `width`-wide piece of it when rows are wide. Each unit is read from global
memory into shared memory by bulk asynchronous copies (one per source row, of the whole piece:
a row piece is contiguous) and written out by one more, with several copies in flight per
program, so the copies of later units overlap the stores of earlier ones.

- `gather`: out[i] = rows[index[i]], a zero row where index[i] < 0.
- `gather_sum`: out[i] = sum_j weights[i, j] * rows[index[i, j]] over the j with index >= 0,
  added in float32 in the order of j. Only those rows are read, through a ring of buffers that
  holds the next copies whatever the rows they belong to.

Indices must be in [-1, N): the callers in `jep_kernels.permute` map everything else to -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jep_kernels.grouped_matmul.mgpu import interpret_params, named


def _kernel(body, out_type, interpret: bool, scratch, *, name: str):
    """A kernel named `name` (its profile name: jep's permutes run under the "jep_permute" name
    scope, `jep.bench.profile.KINDS`)."""
    return plgpu.kernel(
        named(body, name),
        out_type=out_type,
        grid=(_programs(interpret),),
        grid_names=("sm",),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )


def _copy_in(src, dst, barrier):
    """A bulk copy of a contiguous row piece into shared memory (no TMA tiling: in bounds)."""
    plgpu.copy_gmem_to_smem(src, dst, barrier, oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)


def _walk(num_units: int, stages: int, load, store):
    """Runs this program's share of `num_units` units (units sm, sm + P, ...) through `stages`
    shared-memory slots: load(u, slot) starts the copy of unit u, store(u, slot) waits for it
    and writes the unit out (one commit group). A slot is refilled one step after its store was
    issued, once that store has read it."""
    sm, programs = lax.axis_index("sm"), lax.axis_size("sm")
    count = (num_units - sm + programs - 1) // programs

    def unit(j):
        return sm + j * programs

    for s in range(stages):
        @pl.when(s < count)
        def _(s=s):
            load(unit(s), s)

    def step(j, carry):
        store(unit(j), j % stages)
        refill = j - 1 + stages

        @pl.when((j >= 1) & (refill < count))
        def _():
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            load(unit(refill), refill % stages)
        return carry

    lax.fori_loop(0, count, step, None)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gather(rows, index, *, width: int, stages: int, interpret: bool = False):
    """[M, H] out[i] = rows[index[i]] (zero row for -1), in `width`-wide pieces (H % width == 0)."""
    num_out, hidden = index.shape[0], rows.shape[1]
    pieces = hidden // width
    zeros = jnp.zeros((1, width), rows.dtype)

    def body(index_gmem, rows_gmem, zeros_gmem, out_gmem, buffers, barriers):
        def load(u, slot):
            i, piece = u // pieces, u % pieces
            source = index_gmem[i]
            columns = pl.ds(piece * width, width)

            @pl.when(source >= 0)
            def _():
                _copy_in(rows_gmem.at[pl.ds(source, 1), columns], buffers.at[slot],
                         barriers.at[slot])

            @pl.when(source < 0)
            def _():
                _copy_in(zeros_gmem, buffers.at[slot], barriers.at[slot])

        def store(u, slot):
            i, piece = u // pieces, u % pieces
            plgpu.barrier_wait(barriers.at[slot])
            plgpu.copy_smem_to_gmem(buffers.at[slot],
                                    out_gmem.at[pl.ds(i, 1), pl.ds(piece * width, width)])

        _walk(num_out * pieces, stages, load, store)

    scratch = [plgpu.SMEM((stages, 1, width), rows.dtype), plgpu.Barrier(num_barriers=stages)]
    return _kernel(body, jax.ShapeDtypeStruct((num_out, hidden), rows.dtype), interpret,
                   scratch, name="jep_permute_gather")(index, rows, zeros)


def _programs(interpret: bool) -> int:
    return 2 if interpret else getattr(jax.devices()[0], "core_count", None) or 132


def _pair_plan(valid, pieces: int, programs: int):
    """Where each (unit, slot) pair of `gather_sum` sits in its program's stream of copies.

    valid: bool[M, k], the slots with a row to read. Unit u is piece u % pieces of row
    u // pieces; program p takes units p, p + P, ... and reads their valid pairs in order.
    Returns (position i32[U * k]: the pair's place in its program's stream, -1 for an invalid
    slot; stream i32[P, T * k]: the local pair t * k + j of each place, program by program;
    count i32[P]: each program's pairs), T = cdiv(U, P) units a program at most."""
    num_units = valid.shape[0] * pieces
    top_k = valid.shape[1]
    steps = -(-num_units // programs)
    unit_valid = jnp.repeat(valid, pieces, axis=0)  # [U, k]
    unit_valid = jnp.pad(unit_valid, ((0, steps * programs - num_units), (0, 0)))
    by_program = unit_valid.reshape(steps, programs, top_k).transpose(1, 0, 2).reshape(programs, -1)
    place = jnp.cumsum(by_program, axis=1, dtype=jnp.int32) - 1
    place = jnp.where(by_program, place, -1)  # [P, T * k]
    local = jnp.broadcast_to(jnp.arange(steps * top_k, dtype=jnp.int32), place.shape)
    stream = jnp.zeros_like(place).at[jnp.arange(programs)[:, None], place].set(local, mode="drop")
    position = place.reshape(programs, steps, top_k).transpose(1, 0, 2).reshape(-1)
    return position[:num_units * top_k], stream.reshape(-1), by_program.sum(1, dtype=jnp.int32)


def gather_sum(rows, index, weights, *, width: int, ring: int, interpret: bool = False):
    """[M, H] in rows.dtype: out[i] = sum_j weights[i, j] * rows[index[i, j]] over index >= 0,
    in float32, in `width`-wide pieces (H % width == 0). weights: f32[M, k].

    Only the valid pairs are read. Each program streams its units' valid pairs, in order, through
    a ring of `ring` one-piece buffers (`_pair_plan` numbers them): the copy of pair q + ring
    starts once pair q has been added, so up to `ring` copies are in flight whatever the number
    of valid slots a row has. The sum is kept in registers."""
    (num_out, top_k), hidden = index.shape, rows.shape[1]
    pieces = hidden // width
    programs = _programs(interpret)
    steps = -(-num_out * pieces // programs)
    position, stream, count = _pair_plan(index >= 0, pieces, programs)
    flat_index, flat_weights = index.reshape(-1), weights.reshape(-1)

    def body(index_gmem, weights_gmem, position_gmem, stream_gmem, count_gmem, rows_gmem,
             out_gmem, buffers, results, barriers):
        sm, num_programs = lax.axis_index("sm"), lax.axis_size("sm")
        total_pairs = count_gmem[sm]
        num_units = (num_out * pieces - sm + num_programs - 1) // num_programs

        def load(q):
            local = stream_gmem[sm * (steps * top_k) + q]
            u = (local // top_k) * num_programs + sm
            source = index_gmem[(u // pieces) * top_k + local % top_k]
            _copy_in(rows_gmem.at[pl.ds(source, 1), pl.ds((u % pieces) * width, width)],
                     buffers.at[q % ring], barriers.at[q % ring])

        for q in range(ring):
            @pl.when(q < total_pairs)
            def _(q=q):
                load(q)

        def step(t, carry):
            u = t * num_programs + sm
            i, piece = u // pieces, u % pieces
            total = jnp.zeros((1, width), jnp.float32)
            places = [position_gmem[u * top_k + j] for j in range(top_k)]
            for j, q in enumerate(places):
                slot = jnp.maximum(q, 0) % ring

                @pl.when(q >= 0)
                def _(slot=slot):
                    plgpu.barrier_wait(barriers.at[slot])

                # An invalid slot reads whatever its buffer holds and selects zero instead.
                row = buffers[slot].astype(jnp.float32)
                weight = jnp.where(q >= 0, weights_gmem[i * top_k + j], 0.0)
                keep = jnp.broadcast_to(q >= 0, row.shape)
                total = total + weight * jnp.where(keep, row, jnp.zeros_like(row))

            # The result slot of two steps ago is free once at most one store is in flight.
            result = t % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            results[result] = total.astype(results.dtype)
            plgpu.commit_smem()  # also: every thread has read this unit's buffers
            plgpu.copy_smem_to_gmem(results.at[result],
                                    out_gmem.at[pl.ds(i, 1), pl.ds(piece * width, width)])
            for q in places:
                @pl.when((q >= 0) & (q + ring < total_pairs))
                def _(q=q):
                    load(q + ring)
            return carry

        lax.fori_loop(0, num_units, step, None)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    scratch = [plgpu.SMEM((ring, 1, width), rows.dtype),
               plgpu.SMEM((2, 1, width), rows.dtype),
               plgpu.Barrier(num_barriers=ring)]
    return _kernel(body, jax.ShapeDtypeStruct((num_out, hidden), rows.dtype), interpret,
                   scratch, name="jep_permute_gather_sum")(flat_index, flat_weights, position,
                                                            stream, count, rows)
