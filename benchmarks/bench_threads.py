"""Which threads hold OpenMP teams, and what a decode step pays for it: `python benchmarks/bench_threads.py [reqs]`.

A CPU engine decodes fastest when the thread that decodes is the only live one that has run parallel torch ops:
with a second live team libgomp, managing more threads than CPUs, spins only briefly at its barriers and sleeps on
a futex instead, so every parallel region of a step pays wake-ups (README, "fast CPU mode"). Times alone are hard
to read on a shared machine; the voluntary context switches of the whole process per decode step are not (the
mechanism: hundreds a step with a second team, a few without). Each case runs in its own process (a team, once
made, lives as long as its thread), on the small preset (bf16 + int8, 4 frames, 64 new tokens, `reqs` requests,
default 6, one at a time, after a warm-up):

  scheduler-thread, loaded-here   the model loaded on the calling thread (loading.load: the path before
                                  from_pretrained loaded on a thread that ends), then Scheduler.start()
  scheduler-thread                Engine.from_pretrained, then Scheduler.start(), requests submitted from here
  scheduler-thread, after generate
                                  Engine.from_pretrained, one generate() (the engine's model thread has run a
                                  decode), then Scheduler.start(): an application that mixes them (its steps
                                  run on the model thread; before, on the loop's own thread, a second team)
  scheduler-here                  Engine.from_pretrained, then the scheduler driven on this thread (generate_many)
  generate                        Engine.generate on this thread
  generate, 2 pool threads, on each
                                  generation run on each of a pool of 2 threads in turn (a web framework's
                                  workers: Gradio runs a handler on one of up to 40), as generate() ran before
                                  CPU engines had a model thread (Engine._run consumed on the caller)
  generate, 2 pool threads        Engine.generate called from those 2 threads in turn (on the model thread)

Prints median ms a decode step and context switches a step per case; asserts nothing.
"""
import os
import statistics
import subprocess
import sys

CASES = ("scheduler-thread, loaded-here", "scheduler-thread", "scheduler-thread, after generate", "scheduler-here",
         "generate",
         "generate, 2 pool threads, on each", "generate, 2 pool threads")


def switches() -> int:
    """Voluntary context switches of every thread of this process so far."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status", encoding="ascii") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except OSError:  # a thread that ended meanwhile
            pass
    return total


def _on_caller(engine):
    """generate() as it ran before the model thread: Engine._run consumed on the calling thread."""
    from pllava.generate import GenerationOutput, SamplingParams

    def generate(video, prompt, max_new_tokens, logit_bias):
        timings: dict = {}
        params = SamplingParams(max_new_tokens=max_new_tokens, logit_bias=logit_bias)
        toks = [ev.token_id for ev in engine._run(video, prompt, params, None, None, timings)]
        return GenerationOutput("", toks, timings.pop("num_prompt_tokens"), timings)

    return generate


def run_case(case: str, reqs: int):
    import torch

    from pllava import bench
    from pllava.loading import load
    from pllava.runtime import Engine
    from pllava.sequence import Request

    _, adapter = bench.make_preset_checkpoint("small", dtype=torch.bfloat16, device="cpu")
    video = bench.bench_video()
    kw = dict(device="cpu", dtype=torch.bfloat16, quantize="int8", num_frames=4)
    engine = Engine(*load(adapter, **kw)) if case.endswith("loaded-here") else Engine.from_pretrained(adapter, **kw)
    engine.prefix_cache = False
    ask = dict(video=video, prompt="Describe the video.", max_new_tokens=64, logit_bias={2: -100.0})  # no early EOS
    ms, csw = [], []
    if case.startswith("generate"):
        from concurrent.futures import ThreadPoolExecutor

        pools = [ThreadPoolExecutor(1) for _ in range(2)]
        for i in range(reqs + 1):
            c0 = switches()
            call = (lambda f, *a, **k: f(*a, **k)) if case == "generate" else pools[i % 2].submit
            gen = engine.generate if not case.endswith("on each") else _on_caller(engine)
            out = call(gen, ask["video"], ask["prompt"], max_new_tokens=64, logit_bias=ask["logit_bias"])
            out = out if case == "generate" else out.result()
            steps = len(out.token_ids) - 1
            if i:  # the first is the warm-up
                ms.append(out.timings["decode"] / steps * 1e3)
                csw.append((switches() - c0) / steps)
    else:
        if case.endswith("after generate"):
            engine.generate(ask["video"], ask["prompt"], max_new_tokens=8)
        sched = engine.scheduler(max_num_seqs=2)
        if case.startswith("scheduler-thread"):
            sched.start()
        try:
            for i in range(reqs + 1):
                d0, n0, c0 = sched.decode_seconds, sched.decode_steps, switches()
                if case.startswith("scheduler-thread"):
                    sched.submit(Request(**ask)).done.wait()
                else:
                    sched.run([sched.make_sequence(Request(**ask))])
                if i:
                    steps = sched.decode_steps - n0
                    ms.append((sched.decode_seconds - d0) / steps * 1e3)
                    csw.append((switches() - c0) / steps)
        finally:
            sched.stop()
    print(f"{statistics.median(ms):.2f} {statistics.median(csw):.1f} {min(csw):.1f} {max(csw):.1f}")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        return run_case(sys.argv[2], int(sys.argv[3]))
    reqs = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    import torch

    print(f"small preset, bf16 + int8, 4 frames, 64 new tokens, {reqs} requests a case, "
          f"{torch.get_num_threads()} torch threads")
    print("| case | ms a decode step (median) | context switches a step: median (min-max) |")
    print("|---|---:|---:|")
    for case in CASES:
        r = subprocess.run([sys.executable, __file__, "--case", case, str(reqs)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {case} | failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode} | |")
            continue
        med, c, lo, hi = r.stdout.split()[-4:]
        print(f"| {case} | {med} | {c} ({lo}-{hi}) |", flush=True)


if __name__ == "__main__":
    main()
