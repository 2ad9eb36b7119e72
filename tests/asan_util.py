"""Builds a native core with a test driver under AddressSanitizer/UBSan and runs it (tests/native/*.cpp)."""
import os
import subprocess

ROOT = os.path.join(os.path.dirname(__file__), "..")


def run_native(tmp_path, driver: str, ok_line: str, sources=(), sanitize: bool = True):
    """g++ csrc/<sources> + csrc/cpu_isa.cpp (the ISA choice) + tests/native/<driver>, run; asserts a clean exit
    that printed ok_line and returns its stdout. sanitize: under AddressSanitizer/UBSan at -O1, else plain -O2 (a
    driver that sweeps many inputs)."""
    exe = str(tmp_path / os.path.splitext(driver)[0])
    flags = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if sanitize else ["-O2"]
    cmd = (["g++", "-std=c++17", *flags, "-fopenmp"] + [os.path.join(ROOT, "csrc", s) for s in sources]
           + [os.path.join(ROOT, "csrc", "cpu_isa.cpp"), os.path.join(ROOT, "tests", "native", driver), "-o", exe])
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    r = subprocess.run([exe], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, UBSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=1"))
    assert r.returncode == 0 and ok_line in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def run_under_asan(tmp_path, source: str, driver: str, ok_line: str):
    """csrc/<source> with tests/native/<driver> under AddressSanitizer/UBSan (run_native)."""
    run_native(tmp_path, driver, ok_line, sources=(source,))
