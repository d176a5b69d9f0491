"""Reading a cubin's SASS for ``tools/perf_model.py``: resources, the steady-state loop, load
widths and the instruction counts the H200 model needs. Pure Python text processing (plus the
bundled ``cuobjdump`` in ``disassemble``), unit-tested in CI on hand-written listings.

How the steady-state loop is found. ``cuobjdump -sass`` prints one instruction per line with its
address (``/*0440*/``). A branch (``BRA``/``JMP``) whose target lies *before* its own address is a
loop back-edge; the loop body is ``[target, branch]`` (the ``BRA`` to itself after ``EXIT`` is
padding, not a loop). Of all loops, the candidates are those with a global load inside (``LDG``,
``LDGSTS``, TMA) that contain no smaller such loop (innermost); the steady-state loop is the
candidate with the longest body (the weight stream; a split-K reduction loop in the same kernel
loads too, but is short), ties to the most global loads.
Every instruction of the body counts once per back-edge, i.e. per iteration, whatever forward
branches inside would skip (an upper bound; Triton's K loops have none today); a ``CALL`` in the
body adds its subroutine (up to its ``RET``) once per call site. A software-
pipelined loop still has one back-edge per iteration (prologue and epilogue are peeled outside
it). A loop unrolled by ptxas by U with a remainder loop shows as two candidates whose global-load
mix differs by the factor U: ``unroll`` reports U and the caller divides per-iteration figures.

Load widths: ``.U8``/``.S8`` 8 bits, ``.U16``/``.S16`` 16, ``.64`` 64, ``.128`` 128, otherwise 32
(per thread). ``LSU`` cycles charge each warp shuffle (``SHFL``) one cycle (32 lanes per clock per
SM, through the same MIO path as shared memory), and each warp-wide memory instruction one 128-byte
wavefront per
clock: ``max(1, width_bits * 32 / 8 / 128)`` (``LDSM``/``STSM``: ``.x4`` moves 128 bits per
thread). That assumes conflict-free shared accesses and one cache line per gathered ``LDG``, so
it is a lower bound on load/store cycles.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_HEX = re.compile(r"0x([0-9a-fA-F]+)")
_RES = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")

GLOBAL_LOADS = {"LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LD"}
TMA_LOADS = {"UTMALDG", "UBLKCP"}
MEMORY_OPS = GLOBAL_LOADS | {"STG", "ST", "RED", "REDG", "ATOM", "ATOMG", "LDS", "STS", "LDSM", "STSM",
                             "ATOMS", "LDL", "STL", "UTMASTG"}
TENSOR_OPS = {"HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA"}
BRANCHES = {"BRA", "JMP"}
CALLS = {"CALL"}
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_LDSM_WIDTH = {"M88": 32, "M88.2": 64, "M88.4": 128, "MT88": 32, "MT88.2": 64, "MT88.4": 128}


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str
    predicated: bool = False  # guarded by a (non-PT) predicate

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def width_bits(self) -> int:
        """Bits moved per thread by a memory instruction (32 when no width modifier)."""
        mods = self.opcode.split(".")[1:]
        if self.base in ("LDSM", "STSM"):
            tail = ".".join(m for m in mods if m.startswith("M") or m.isdigit() and m != "16")
            return _LDSM_WIDTH.get(tail, 32)
        width = 32
        for m in mods:
            width = _WIDTHS.get(m, width)
        return width

    @property
    def lsu_cycles(self) -> float:
        if self.base == "SHFL":
            return 1.0
        if self.base not in MEMORY_OPS:
            return 0.0
        if self.base in TMA_LOADS:
            return 1.0  # one thread issues a bulk copy; the copy engine moves the bytes
        return max(1.0, self.width_bits * 32 / 8 / 128)

    def branch_target(self) -> int | None:
        return self._target(BRANCHES)

    def call_target(self) -> int | None:
        return self._target(CALLS)

    def _target(self, kinds) -> int | None:
        if self.base not in kinds:
            return None
        m = _HEX.search(self.operands)
        return int(m.group(1), 16) if m else None


def parse_sass(text: str) -> list[Instr]:
    """Instructions of the (single-kernel) listing, in address order; NOPs dropped."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        raw = m.group(2).strip()
        body = _PRED.sub("", raw)
        if not body:
            continue
        opcode, _, operands = body.partition(" ")
        if opcode == "NOP":
            continue
        predicated = body != raw and not raw.startswith("@PT ")
        out.append(Instr(int(m.group(1), 16), opcode, operands.strip(), predicated))
    return out


def parse_res_usage(text: str) -> dict:
    """``cuobjdump -res-usage`` fields of the one kernel: REG, STACK, SHARED, LOCAL (ints)."""
    for line in text.splitlines():
        if "REG:" in line:
            return {k: int(v) for k, v in _RES.findall(line)}
    raise ValueError(f"no 'REG:' line in cuobjdump -res-usage output: {text[:300]!r}")


@dataclass
class Loop:
    start: int
    end: int
    instrs: list[Instr] = field(repr=False)

    @property
    def n_instr(self) -> int:
        return len(self.instrs)

    def global_loads(self) -> list[Instr]:
        return [i for i in self.instrs if i.base in GLOBAL_LOADS]

    def load_mix(self) -> Counter:
        return Counter(i.opcode for i in self.global_loads())

    def contains(self, other: "Loop") -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every back-edge ``[target, branch]`` as a Loop (module docstring)."""
    loops = []
    for ins in instrs:
        t = ins.branch_target()
        if t is not None and t < ins.addr:
            loops.append(Loop(t, ins.addr, [i for i in instrs if t <= i.addr <= ins.addr]))
    return loops


def callee(instrs: list[Instr], target: int) -> list[Instr]:
    """The subroutine at ``target``: its instructions up to and including the first ``RET``."""
    body = []
    for ins in instrs:
        if ins.addr >= target:
            body.append(ins)
            if ins.base == "RET":
                break
    return body


ATOMICS = {"ATOMG", "ATOM", "RED", "REDG"}


def cold_region(instrs: list[Instr], after: int) -> list[Instr]:
    """Instructions after the first predicated ``EXIT`` that follows an atomic at or after address
    ``after`` (the end of the main loop): a split-K kernel's "the last program reduces the partials"
    block, which only the programs that did not exit run. Empty when the kernel has no such exit."""
    seen_atomic = False
    for k, ins in enumerate(instrs):
        if ins.addr < after:
            continue
        if ins.base in ATOMICS:
            seen_atomic = True
        elif seen_atomic and ins.base == "EXIT" and ins.predicated:
            return instrs[k + 1:]
    return []


def with_callees(body: list[Instr], instrs: list[Instr]) -> list[Instr]:
    """``body`` plus, for each ``CALL`` in it, the called subroutine's instructions (once per
    call site: a call executes its callee each time it runs)."""
    out = list(body)
    for ins in body:
        t = ins.call_target()
        if t is not None:
            out += callee(instrs, t)
    return out


def steady_state_loop(loops: list[Loop]) -> tuple[Loop | None, int]:
    """The weight-streaming loop and its unroll factor (module docstring); ``(None, 1)`` when no
    loop has a global load (e.g. one tile per program)."""
    loading = [lp for lp in loops if lp.global_loads()]
    innermost = [lp for lp in loading if not any(lp.contains(o) for o in loading)]
    if not innermost:
        return None, 1
    main = max(innermost, key=lambda lp: (lp.n_instr, len(lp.global_loads())))
    unroll = 1
    mix = main.load_mix()
    for other in innermost:
        if other is main:
            continue
        omix = other.load_mix()
        total, ototal = sum(mix.values()), sum(omix.values())
        if ototal and total % ototal == 0 and total // ototal >= 2:
            u = total // ototal
            if all(mix[k] == u * omix[k] for k in mix | omix):
                unroll = max(unroll, u)
    return main, unroll


@dataclass
class SassStats:
    """What the model reads from one cubin."""
    regs: int
    spills: int  # bytes of per-thread local memory (stack frame + local), where spills go
    static_smem: int
    n_instr: int  # whole kernel, NOPs excluded
    lsu_cycles: float  # whole kernel, per warp
    tensor_core: bool
    tensor_ops: dict  # {opcode base: count}, e.g. {"HGMMA": 8} (wgmma) or {"HMMA": 64} (mma.sync)
    spill_instr: int  # LDL/STL in the whole kernel
    loop_instr: int = 0  # per back-edge (0: no loop)
    loop_lsu_cycles: float = 0.0
    unroll: int = 1
    ldg_bits_max: int = 0  # in the loop, or in the whole kernel when there is none
    ldg_bits_hist: dict = field(default_factory=dict)  # {bits: count} of global loads, same scope
    tma_loads: int = 0
    loop_span: tuple | None = None  # (start, end) addresses
    cold_instr: int = 0  # after a predicated EXIT that follows an atomic (``cold_region``)
    cold_lsu_cycles: float = 0.0
    # the cold instructions and their LSU cycles by loop depth inside the cold block:
    # {depth: (instructions, lsu cycles)} (a split-K reduction loops over row blocks and splits)
    cold_by_depth: dict = field(default_factory=dict)

    @property
    def nonloop_instr(self) -> int:
        return max(0, self.n_instr - self.loop_instr)

    @property
    def nonloop_lsu_cycles(self) -> float:
        return max(0.0, self.lsu_cycles - self.loop_lsu_cycles)


def analyse(sass_text: str, res_text: str) -> SassStats:
    """SassStats from ``cuobjdump -sass`` and ``cuobjdump -res-usage`` outputs of one kernel."""
    instrs = parse_sass(sass_text)
    if not instrs:
        raise ValueError("no SASS instructions found in the cuobjdump listing")
    res = parse_res_usage(res_text)
    loops = find_loops(instrs)
    loop, unroll = steady_state_loop(loops)
    scope = loop.instrs if loop is not None else instrs
    per_iter = with_callees(loop.instrs, instrs) if loop is not None else []
    cold = cold_region(instrs, loop.end if loop is not None else 0)
    cold_addrs = {i.addr for i in cold}
    cold_loops = [lp for lp in loops if lp.start in cold_addrs]
    by_depth: dict = {}
    for i in cold:
        d = sum(lp.start <= i.addr <= lp.end for lp in cold_loops)
        n, c = by_depth.get(d, (0, 0.0))
        by_depth[d] = (n + 1, c + i.lsu_cycles)
    loads = [i for i in scope if i.base in GLOBAL_LOADS]
    hist = Counter(128 if i.base in TMA_LOADS else i.width_bits for i in loads)
    return SassStats(
        regs=res.get("REG", 0),
        spills=res.get("STACK", 0) + res.get("LOCAL", 0),
        static_smem=res.get("SHARED", 0),
        n_instr=len(instrs),
        lsu_cycles=sum(i.lsu_cycles for i in instrs),
        tensor_core=any(i.base in TENSOR_OPS for i in instrs),
        tensor_ops=dict(Counter(i.base for i in instrs if i.base in TENSOR_OPS)),
        spill_instr=sum(i.base in ("LDL", "STL") for i in instrs),
        loop_instr=len(per_iter),
        loop_lsu_cycles=sum(i.lsu_cycles for i in per_iter),
        unroll=unroll,
        ldg_bits_max=max(hist) if hist else 0,
        ldg_bits_hist={str(k): hist[k] for k in sorted(hist)},
        tma_loads=sum(i.base in TMA_LOADS for i in loads),
        loop_span=(loop.start, loop.end) if loop else None,
        cold_instr=len(cold),
        cold_lsu_cycles=sum(i.lsu_cycles for i in cold),
        cold_by_depth=by_depth,
    )


_PTX_REG = re.compile(r"%[a-z]+[0-9]+")
_PTX_BITS = {"8": 8, "16": 16, "32": 32, "64": 64, "128": 128}


def _ptx_statements(ptx: str):
    """``(opcode, operands)`` of each PTX instruction line (comments, directives, labels and
    predicates stripped; Triton emits one instruction per line)."""
    for line in ptx.splitlines():
        line = line.split("//", 1)[0].strip().rstrip(";").strip()
        if not line or line[0] in ".{}()$" or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%p[0-9]+\s+", "", line)
        opcode, _, operands = line.partition(" ")
        yield opcode, operands.strip()


def _ptx_load_bits(opcode: str, operands: str) -> int:
    """Bits per thread of a ``ld.global`` (vector width x element) or ``cp.async`` (size x 8)."""
    parts = opcode.split(".")
    if parts[0] == "cp":
        sizes = [int(s, 0) for s in re.findall(r"\],\s*(0x[0-9a-fA-F]+|\d+)", operands)]
        return 8 * sizes[0] if sizes else 0
    vec = 1
    elem = 0
    for p in parts:
        if p in ("v2", "v4", "v8"):
            vec = int(p[1:])
        elif p[:1] in "bfus" and p[1:] in _PTX_BITS:
            elem = _PTX_BITS[p[1:]]
    return vec * elem


def weight_load_bits(ptx: str, param_index: int) -> Counter:
    """``{bits: count}`` of the global loads whose address derives from kernel parameter
    ``param_index`` (the packed-weight pointer): registers loaded from that parameter taint every
    register computed from them (not through loads: a loaded value is data, not an address);
    ``ld.global`` / ``cp.async`` with a tainted address are the weight loads. Iterated to a
    fixpoint, so loop-carried pointer increments are followed."""
    stmts = list(_ptx_statements(ptx))
    pname = re.compile(rf"_param_{param_index}\]")
    tainted: set[str] = set()
    for _ in range(32):
        before = len(tainted)
        for opcode, ops in stmts:
            regs = _PTX_REG.findall(ops)
            if not regs:
                continue
            if opcode.startswith("ld.param") and pname.search(ops):
                tainted.add(regs[0])
            elif opcode.startswith(("ld.", "st.", "cp.", "atom.", "red.")):
                continue  # loads produce data; stores / copies define no register
            elif any(r in tainted for r in regs[1:]):
                dests = re.match(r"\s*\{([^}]*)\}", ops)
                tainted.update(_PTX_REG.findall(dests.group(1)) if dests else regs[:1])
        if len(tainted) == before:
            break
    out: Counter = Counter()
    for opcode, ops in stmts:
        addrs = re.findall(r"\[\s*(%[a-z]+[0-9]+)", ops)
        if opcode.startswith("ld.global") and addrs:
            addr = addrs[0]
        elif opcode.startswith("cp.async") and ".global" in opcode and len(addrs) > 1:
            addr = addrs[1]  # cp.async [shared dst], [global src], size
        else:
            continue
        if addr in tainted:
            out[_ptx_load_bits(opcode, ops)] += 1
    return out


def disassemble(cubin: bytes, cuobjdump: str) -> tuple[str, str]:
    """``(cuobjdump -sass, cuobjdump -res-usage)`` of a cubin, via a temporary file."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        outs = []
        for flag in ("-sass", "-res-usage"):
            r = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{cuobjdump} {flag} failed ({r.returncode}): {r.stderr.strip()[:500]}")
            outs.append(r.stdout)
    return outs[0], outs[1]
