"""scripts/sass.py and scripts/sass_moe.py: the machine-code reports docs/performance.md quotes (a
kernel compiled for sm_90 on a CPU, its main loop counted, what a CTA takes of an SM) keep working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from sass import Build  # noqa: E402


def test_ctas_an_sm_follow_the_scarcest_of_registers_shared_memory_and_warps():
    assert Build("", registers=121, stack=0, shared=56 * 1024, num_warps=8).ctas_per_sm == 2  # registers
    assert Build("", registers=64, stack=0, shared=100 * 1024, num_warps=4).ctas_per_sm == 2  # shared memory
    assert Build("", registers=32, stack=0, shared=0, num_warps=16).ctas_per_sm == 4  # 64 warps an SM
    assert Build("", registers=255, stack=40, shared=81 * 1024, num_warps=4).ctas_per_sm == 2


def test_the_moe_gemm_report_compiles_for_hopper_on_a_cpu():
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script compiles for sm_90
    done = subprocess.run([sys.executable, "scripts/sass_moe.py", "--tokens", "1024"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 1,024 tokens")]
    assert [r[1].strip() for r in rows] == ["mlp1", "mlp2"]
    for r in rows:
        hgmma, registers, ctas = int(r[3]), int(r[-4]), int(r[-1])
        assert hgmma > 0 and 0 < registers <= 255 and ctas >= 1, r
