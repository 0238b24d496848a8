# Sourced by benches/call_cpu.sh and benches/window_cpu.sh: a process's CPU from /proc.
# cpu_ticks PID: its user + system time so far, in clock ticks.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# cpu_percent TICKS0 TICKS1 SECONDS0 SECONDS1: the share of one core (%) used between two
# samples (the seconds are wall-clock times, e.g. from date +%s.%N).
cpu_percent() { echo "($2-$1)/$(getconf CLK_TCK)/($4-$3)*100" | bc -l | cut -c1-5; }
