"""``neuron-fleet predict``: TTFT, ITL and throughput of a layout before renting the host.

- ``records``: the published inf2 records (shipped as package data) and their statistics;
- ``timing``: prefill/decode step durations fitted to them;
- ``queue``: replicas + routing + clients in virtual time;
- ``replay``: one record's prediction, and the fit of the serving terms;
- ``plan``: a layout, its workload, the rate an SLO allows and the sweep;
- ``cli``: the subcommand.
"""
