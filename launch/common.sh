# Shared by the launch scripts: print a command as it would be typed (words with shell characters
# single-quoted), with show prefixing '+ '; run prints it and runs it unless DRY=1.
words() {
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $w"
    else out+=" '${w//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "${out# }"
}
show() { printf '+ %s\n' "$(words "$@")"; }
run() { show "$@"; [ "$DRY" = 1 ] || "$@"; }
# The jax version in requirements.lock: accelerator extras (jax[cuda13], jax[tpu]) are pinned to it,
# so the plugin matches the jax that setup.sh installed.
locked_jax() { sed -n 's/^jax==\([^ ]*\).*/\1/p' "${1:-requirements.lock}"; }
