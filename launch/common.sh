# Shared by the launch scripts: print a command as it would be typed (words with shell characters
# single-quoted, prefixed '+ '), then run it unless DRY=1.
show() {
  local out="+" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $w"
    else out+=" '${w//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "$out"
}
run() { show "$@"; [ "$DRY" = 1 ] || "$@"; }
