# Sourced by the bench studies: run_all CONFIG OUT SPEC... trains one run per SPEC ("name key=value
# ..."; extra args common to all in the COMMON array) into OUT/name, resuming a run that was cut
# off and skipping one that finished, then writes one `spjax report` over them to OUT/REPORT.
run_all() {
  local config=$1 out=$2; shift 2
  local py=${PYTHON:-.venv/bin/python} dirs=() spec name overrides start resume
  mkdir -p "$out"
  for spec in "$@"; do
    read -r name overrides <<< "$spec"
    dirs+=("$out/$name")
    [ -f "$out/$name/export/config.json" ] && { echo "== $name: done already"; continue; }
    resume=(); [ -f "$out/$name/config.txt" ] && resume=(--resume)
    start=$SECONDS
    # shellcheck disable=SC2086
    "$py" -m spjax.train --config "$config" --workdir "$out/$name" "${resume[@]}" "${COMMON[@]}" $overrides \
      > "$out/$name.log" 2>&1 || { echo "== $name failed: see $out/$name.log"; return 1; }
    echo "== $name: $((SECONDS - start)) s"
  done
  "$py" -m spjax.report "${dirs[@]}" --out "$out/${REPORT:-report}"
}
