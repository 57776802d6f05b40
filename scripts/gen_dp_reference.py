#!/usr/bin/env python3
"""Generate the DP accountant reference table used by aggregation/tests/accountant.rs.

Reference: Google's dp-accounting (RdpAccountant, default orders), i.e. the
RDP of the Poisson-subsampled Gaussian mechanism composed T times and its
conversion to (epsilon, delta).

    python3 -m venv /tmp/venv-dp && /tmp/venv-dp/bin/pip install dp-accounting
    /tmp/venv-dp/bin/python scripts/gen_dp_reference.py > aggregation/tests/data/dp_reference.csv
"""
import sys

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

QS = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0]
SIGMAS = [0.5, 0.8, 1.0, 1.5, 3.0, 10.0]
TS = [1, 10, 100, 1000]
DELTAS = [1e-5, 1e-7]

print("# dp-accounting 0.6.0 (RdpAccountant, default orders); PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) composed `rounds` times")
print("q,sigma,rounds,delta,epsilon,order")
for q in QS:
    for sigma in SIGMAS:
        for t in TS:
            for delta in DELTAS:
                acc = rdp.RdpAccountant()
                acc.compose(
                    dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), t
                )
                eps, order = acc.get_epsilon_and_optimal_order(delta)
                print(f"{q!r},{sigma!r},{t},{delta!r},{float(eps)!r},{float(order)!r}")
sys.stdout.flush()
