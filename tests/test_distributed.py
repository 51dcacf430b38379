"""Multi-process training: DistributedDataParallel over gloo with 2 processes on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    # Keep gloo on the loopback interface; one thread per process (2 processes, 2 cores).
    path = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                OMP_NUM_THREADS="1", PYTHONPATH=path)


def test_ddp_two_processes_average_gradients_and_keep_replicas_identical(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(r), "2",
                               str(port), str(outs[r])],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    results = [json.loads(o.read_text()) for o in outs]
    for backward in ("sparse", "dense"):
        r0, r1 = (res["results"][backward] for res in results)
        for r in (r0, r1):
            assert r["ranks_had_different_gradients"]  # averaging had something to do
            assert r["max_grad_error"] < 1e-12
            assert r["weights_identical"] and r["weights_moved"]
        assert (r0["checksum"], r0["checksum_sq"]) == (r1["checksum"], r1["checksum_sq"])


def test_torchrun_sparsegrad_train_two_processes(tmp_path):
    pytest.importorskip("sklearn")  # the digits dataset
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "sparsegrad.train", "--dataset", "digits", "--epochs", "1", "--hidden", "16",
           "--batch-size", "32", "--train-limit", "128", "--test-limit", "64", "--device", "cpu",
           "--no-plots", "--no-progress", "--out", str(out_dir)]
    proc = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["world_size"] == 2
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert len(metrics) >= 1
    # Only rank 0 reports: the summary table is printed once.
    assert proc.stdout.count("sparsegrad.train: digits") == 1
