"""keep_freed_memory: after it, allocating and freeing the same activations costs no page faults."""

import subprocess
import sys
import textwrap

import pytest

from minift.allocator import _glibc_mallopt

PROBE = textwrap.dedent("""
    import resource
    import numpy as np
    from minift.allocator import keep_freed_memory

    def training_step():
        # a forward pass keeps 40 activations of 3 MiB (one MLP activation each); backward frees them
        activations = [np.ones((4, 128, 1536), dtype=np.float32) for _ in range(40)]
        del activations

    def faults_per_step(steps=3):
        training_step()  # warm-up: the first arrays of any process need new pages
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            training_step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

    default = faults_per_step()
    applied = keep_freed_memory()
    print(default, faults_per_step(), applied, keep_freed_memory())
""")


@pytest.mark.skipif(_glibc_mallopt() is None, reason="this C library has no mallopt (not glibc)")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, kept, applied, again = out.split()
    pages = 40 * 4 * 128 * 1536 * 4 // 4096
    assert float(default) >= 0.5 * pages  # glibc's default: the freed heap is trimmed, each step faults again
    assert float(kept) < 0.05 * pages  # kept: the freed blocks are handed out again
    assert applied == again == "True"
