"""``steerkern backends``: which backend runs each op, and why others do not."""


def register(sub) -> None:
    p = sub.add_parser("backends", help="print which backend each op uses on CPU and CUDA")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import backend_report
    from ..kernels import cpu

    print(backend_report())
    if cpu.capability:
        print(f"cpu kernels: {cpu.capability}")
    return 0
