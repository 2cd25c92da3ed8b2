# `make help`: each variable with its value and the comment block above its `VAR ?=` line (a
# block covers the consecutive `?=` lines under it). Files come in order Makefile, then the
# presets (a later file's comment wins). Called with -v vars="A B C" -v values_file=F, where F
# holds `NAME=value` lines.
BEGIN {
    n = split(vars, order, " ")
    while ((getline line < values_file) > 0) {
        i = index(line, "=")
        value[substr(line, 1, i - 1)] = substr(line, i + 1)
    }
}
FNR == 1 { block = ""; prev = "" }
/^#/ {
    if (prev == "var") block = ""
    block = block (block == "" ? "" : "\n") substr($0, 3)
    prev = "comment"
    next
}
/^[A-Z_]+ *\?=/ {
    name = $1
    sub(/\?=.*/, "", name)
    gsub(/ /, "", name)
    if (block != "") comment[name] = block
    prev = "var"
    next
}
{ block = ""; prev = "" }
END {
    for (k = 1; k <= n; k++) {
        v = order[k]
        printf "  %s = %s\n", v, value[v]
        c = comment[v]
        gsub(/\n/, "\n      ", c)
        if (c != "") printf "      %s\n", c
    }
}
