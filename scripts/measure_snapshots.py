"""One-off: snapshot and fork-64 of a 500 MiB workspace with thousands of files, beside cp -a;
create -> first exec with the disk layer and the memory layer. Run with nice, as root."""
import asyncio, os, shutil, statistics, subprocess, sys, tempfile, time
sys.path[:0] = ["tests/runtime", "tests"]
from pathlib import Path
from test_bubblewrap_runtime import config, sh
from aviato.runtime.bubblewrap import BubblewrapRuntime
MiB = 1 << 20

def du(path):
    return int(subprocess.run(["du", "-sb", "--apparent-size", str(path)], capture_output=True, text=True).stdout.split()[0]), \
           int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()[0]) * 1024

async def main():
    sd = Path(tempfile.mkdtemp(prefix="avmeasure-", dir="/var/tmp"))
    rt = BubblewrapRuntime(sd, max_sandboxes=200)
    out = {}
    try:
        src = await rt.create(config(writable_layer="disk", disk_bytes=1024 * MiB, memory_bytes=2048 * MiB))
        # 5000 files of 100 KiB in 50 directories = 500 MiB
        code, o, e = await sh(src, "cd /workspace && for d in $(seq 1 50); do mkdir d$d; "
                              "head -c 10M /dev/urandom | split -b 100K - d$d/f; done; "
                              "find . -type f | wc -l; du -sm .", 600)
        out["workspace"] = o.split()
        t = time.perf_counter()
        facts = await src.snapshot("snap-measure0001", 2048 * MiB)
        out["snapshot_s"] = round(time.perf_counter() - t, 3)
        out["snapshot_bytes"] = facts.size_bytes
        out["snapshot_du"] = du(rt.snapshots.tree("snap-measure0001"))
        # cp -a of the same tree, from the host's view of the sandbox's layer
        cpdst = sd / "cp-a"
        t = time.perf_counter()
        subprocess.run(["cp", "-a", str(sd / "layers" / src.sandbox_id / "upper" / "workspace"), str(cpdst)], check=True)
        out["cp_a_s"] = round(time.perf_counter() - t, 3)
        out["cp_a_du"] = du(cpdst)
        for layer in ("memory", "disk"):
            t = time.perf_counter()
            forks = await asyncio.gather(*[
                rt.create(config(writable_layer=layer, snapshot_id="snap-measure0001", disk_bytes=256 * MiB))
                for _ in range(64)])
            out[f"fork64_{layer}_s"] = round(time.perf_counter() - t, 3)
            code, o, _ = await sh(forks[17], "ls /workspace/d7 | wc -l; echo x > /workspace/d1/faa")
            out[f"fork64_{layer}_check"] = o.split()
            used = 0
            for f in forks:
                if layer == "disk":
                    used += os.stat(sd / "layers" / f"{f.sandbox_id}.img").st_blocks * 512
                else:
                    st = os.statvfs(sd / "layers" / f.sandbox_id)
                    used += (st.f_blocks - st.f_bfree) * st.f_frsize
            out[f"fork64_{layer}_layers_bytes"] = used
            for f in forks:
                await rt.cleanup(f.sandbox_id)
        # create -> first exec
        for layer in ("memory", "disk"):
            times = []
            for _ in range(20):
                t = time.perf_counter()
                h = await rt.create(config(writable_layer=layer, disk_bytes=1024 * MiB))
                await sh(h, "true")
                times.append((time.perf_counter() - t) * 1000)
                await rt.cleanup(h.sandbox_id)
            out[f"create_first_exec_{layer}_ms_p50"] = round(statistics.median(times), 2)
            out[f"create_first_exec_{layer}_ms_min"] = round(min(times), 2)
    finally:
        for sid in rt.list_present():
            await rt.cleanup(sid)
        await rt.close()
        subprocess.run(["umount", "-l", str(sd / "layers")], capture_output=True)
        shutil.rmtree(sd, ignore_errors=True)
    for k, v in out.items():
        print(k, v)

asyncio.run(main())
