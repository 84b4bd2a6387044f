# Sourced by the README's commands: re-run the calling script as root when it is not (with sudo, which
# asks for a password if it must); as root it does nothing, so it works where there is no sudo at all.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -E bash "$0" "$@"
  fi
  echo "$(basename "$0"): needs root (BPF, network namespaces, packages) and there is no sudo; run it as root" >&2
  exit 1
fi
