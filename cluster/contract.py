"""What launchers and training processes agree on: environment variables and exit codes.

A launcher (`launch.local`, `launch.k8s`, `launch.slurm`) sets these variables for every process
it starts; `cluster.distributed.initialize` reads them. A process that its watchdog stops because
another one failed or was lost exits with `EXIT_PEER_FAILED`, so a launcher can tell it from the
root cause. No jax import here: the launchers import this module on a login node.
"""

ENV_COORDINATOR = 'JAXDIFF_COORDINATOR'  # host:port of process 0's coordination service.
ENV_NUM_PROCESSES = 'JAXDIFF_NUM_PROCESSES'  # How many processes the job has.
ENV_PROCESS_ID = 'JAXDIFF_PROCESS_ID'  # This process's index, 0 .. num_processes - 1.
ENV_COORDINATOR_PORT = 'JAXDIFF_COORDINATOR_PORT'  # SLURM: instead of the job-id-derived port.
ENV_HEARTBEAT_TIMEOUT = 'JAXDIFF_HEARTBEAT_TIMEOUT_S'  # Seconds before a silent process is lost.
ENV_WATCHDOG = 'JAXDIFF_WATCHDOG'  # '0' (or another of OFF_WORDS) turns the watchdog off.

# What a switch variable (JAXDIFF_WATCHDOG, JAXDIFF_CACHE_DIR, JAXDIFF_TRACE_CACHE) says for off.
OFF_WORDS = ('off', '0', 'none', 'false', 'no')

EXIT_PEER_FAILED = 3  # Exit status of a process stopped because another one failed or was lost.
