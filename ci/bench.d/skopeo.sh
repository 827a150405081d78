# Sourced by the benchmarks: `skopeo_run ARGS…` runs skopeo with a fresh blob-info cache every
# time, so no cross-repository mount shortcuts from earlier rounds; as root (whose cache lives in
# /var/lib/containers whatever HOME says) it runs as nobody with its own HOME. Needs $work.
skopeo_run() {
  local home
  home=$(mktemp -d "$work/skopeo-home.XXXXXX")
  if ((EUID == 0)); then
    chown nobody "$home"
    setpriv --reuid=nobody --regid=nogroup --clear-groups \
      env HOME="$home" XDG_DATA_HOME="$home/data" XDG_RUNTIME_DIR="$home" XDG_CONFIG_HOME="$home/config" \
      skopeo --insecure-policy "$@"
  else
    env HOME="$home" XDG_DATA_HOME="$home/data" XDG_RUNTIME_DIR="$home" XDG_CONFIG_HOME="$home/config" \
      skopeo --insecure-policy "$@"
  fi
}
