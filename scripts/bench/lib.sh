# Shared by the bench shell scripts (sourced): waiting for a server.

# wait_up PORT [PATH]: returns once http://127.0.0.1:PORT/PATH (default
# /health) answers 2xx; after 5 minutes, says which port never came up and
# exits the script (a bench against a server that is not there measures nothing).
wait_up() {
  local port=$1 path=${2:-/health}
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port$path" >/dev/null && return
    sleep 0.5
  done
  echo "not up after 5 minutes: 127.0.0.1:$port$path" >&2
  exit 1
}
