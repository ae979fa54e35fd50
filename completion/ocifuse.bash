# bash completion for ocifuse(1): commands, their options, -o mount options, cache verbs, and
# for umount the ocifuse mounts there are. Needs nothing but bash (bash-completion loads it from
# its completions directory; or source this file). The lists are checked against ocifuse's own
# (tests/test_completion.py), so keep them in step with ocifuse/cli.py and ocifuse/options.py.

_ocifuse_commands="fsck inspect mount umount cache index"
_ocifuse_global_options="-h --help --version"
_ocifuse_fsck_options="-h --help --json --layers --cache --no-cache --cache-max --index"
_ocifuse_inspect_options="-h --help --ref --platform --json --cache --no-cache --cache-max --index"
_ocifuse_mount_options="-h --help -f --foreground -o --verify --rootfs --ref --platform --rootless --ignore-diff-ids -d --debug --cache --no-cache --cache-max"
_ocifuse_umount_options="-h --help -z --lazy"
_ocifuse_cache_options="-h --help --cache --max --older-than"
_ocifuse_index_options="-h --help -o --output"
_ocifuse_cache_verbs="list prune clear"
# Options that take the next word as their value (or after '=').
_ocifuse_value_options="-o --ref --platform --cache --cache-max --max --older-than --index --output"
# -o: ocifuse's own, those passed to FUSE and those always on (options.py); not the ones it ignores.
_ocifuse_o_options="ro nodev nosuid default_permissions verify debug nonempty rootfs rootless ignore_diff_ids nocache readahead_kb= timeout= cafile= credentials= index= ref= platform= cache= max_size= spill_max= cache_max= allow_other allow_root auto_unmount noexec exec noatime atime async sync dirsync fsname= context= fscontext= defcontext= rootcontext="
_ocifuse_platforms="linux/amd64 linux/arm64 linux/arm64/v8 linux/arm/v7 linux/arm/v6 linux/386 linux/ppc64le linux/s390x linux/riscv64"

# The mountpoints of the ocifuse mounts in /proc/self/mountinfo (proc(5)), one a line.
_ocifuse_mounts() {
    local -a f
    local i
    while read -r -a f; do
        for ((i = 6; i < ${#f[@]}; i++)); do
            [[ ${f[i]} == - ]] && break
        done
        [[ ${f[i + 1]} == fuse.ocifuse ]] && printf '%s\n' "${f[4]//\\040/ }"
    done < /proc/self/mountinfo 2>/dev/null
}

# COMPREPLY from the words of $1 that start with $2, each prefixed with $3.
_ocifuse_add() {
    local w
    for w in $1; do
        [[ $w == "$2"* ]] && COMPREPLY+=("$3$w")
    done
}

# The comma-separated -o list so far in $1: complete its last item.
_ocifuse_o() {
    local done="" last=$1
    if [[ $1 == *,* ]]; then
        done=${1%,*},
        last=${1##*,}
    fi
    case $last in
        index=* | cafile=*)
            local f
            while IFS= read -r f; do COMPREPLY+=("${done}${last%%=*}=$f"); done < <(compgen -f -- "${last#*=}")
            compopt -o nospace 2>/dev/null
            ;;
        cache=*)
            local d
            while IFS= read -r d; do COMPREPLY+=("${done}cache=$d/"); done < <(compgen -d -- "${last#cache=}")
            compopt -o nospace 2>/dev/null
            ;;
        platform=*) _ocifuse_add "$_ocifuse_platforms" "${last#platform=}" "${done}platform=" ;;
        *=*) ;;
        *)
            _ocifuse_add "$_ocifuse_o_options" "$last" "$done"
            [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *= ]] && compopt -o nospace 2>/dev/null
            ;;
    esac
}

_ocifuse() {
    COMPREPLY=()
    # The words up to the cursor, re-split at blanks only: bash's own split (COMP_WORDS) also
    # breaks "cache=/tmp" at '=', which would hide which option a value belongs to.
    local line=${COMP_LINE:0:COMP_POINT}
    local -a words
    read -r -a words <<<"$line"
    local cur=""
    if [[ $line != *[[:space:]] && ${#words[@]} -gt 0 ]]; then
        cur=${words[${#words[@]} - 1]}
        unset 'words[${#words[@]}-1]'
    fi
    local prev=""
    [[ ${#words[@]} -gt 0 ]] && prev=${words[${#words[@]} - 1]}

    # The command and how many positional words follow it, skipping options and their values.
    local cmd="" w i positional=0 skip=0
    for ((i = 1; i < ${#words[@]}; i++)); do
        w=${words[i]}
        if ((skip)); then
            skip=0
        elif [[ $w == -* ]]; then
            [[ " $_ocifuse_value_options " == *" $w "* ]] && skip=1
        elif [[ -z $cmd ]]; then
            cmd=$w
            if [[ " $_ocifuse_commands " != *" $w "* ]]; then
                cmd=mount # mount.fuse3's form: ocifuse SOURCE MOUNTPOINT -o OPTS
                positional=1
            fi
        else
            ((positional++))
        fi
    done

    if ((skip)); then # the value of $prev
        case $prev in
            -o) _ocifuse_o "$cur" ;;
            --platform) _ocifuse_add "$_ocifuse_platforms" "$cur" "" ;;
            --cache) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -d -- "$cur") ;;
            -o | --output | --index) [[ $cmd != mount ]] && { compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- "$cur"); } ;;
        esac
    elif [[ $cur == --*=* ]]; then # --cache=DIR, --platform=P
        local opt=${cur%%=*} value=${cur#*=}
        case $opt in
            --platform) _ocifuse_add "$_ocifuse_platforms" "$value" "$opt=" ;;
            --cache) while IFS= read -r w; do COMPREPLY+=("$opt=$w/"); done < <(compgen -d -- "$value"); compopt -o nospace 2>/dev/null ;;
        esac
    elif [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            _ocifuse_add "$_ocifuse_global_options" "$cur" ""
        else
            _ocifuse_add "$_ocifuse_commands" "$cur" ""
            # mount.fuse3's form, ocifuse SOURCE MOUNTPOINT: a path that is no command
            [[ ${#COMPREPLY[@]} -eq 0 ]] && { compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- "$cur"); }
        fi
    elif [[ $cur == -* ]]; then
        local var=_ocifuse_${cmd}_options
        _ocifuse_add "${!var-}" "$cur" ""
    else
        case $cmd in
            cache) ((positional == 0)) && _ocifuse_add "$_ocifuse_cache_verbs" "$cur" "" ;;
            umount)
                if ((positional == 0)); then
                    compopt -o filenames 2>/dev/null
                    while IFS= read -r w; do [[ $w == "$cur"* ]] && COMPREPLY+=("$w"); done < <(_ocifuse_mounts)
                    [[ ${#COMPREPLY[@]} -eq 0 ]] && mapfile -t COMPREPLY < <(compgen -d -- "$cur")
                fi
                ;;
            fsck | inspect | index)
                if ((positional == 0)); then
                    compopt -o filenames 2>/dev/null
                    mapfile -t COMPREPLY < <(compgen -f -- "$cur")
                fi
                ;;
            mount)
                compopt -o filenames 2>/dev/null
                if ((positional == 0)); then
                    mapfile -t COMPREPLY < <(compgen -f -- "$cur")
                elif ((positional == 1)); then
                    mapfile -t COMPREPLY < <(compgen -d -- "$cur")
                fi
                ;;
        esac
    fi

    # bash replaces only the part of the word after its last COMP_WORDBREAKS character (':' '='):
    # drop that much of each reply.
    local n=${#cur}
    while ((n > 0)) && [[ $COMP_WORDBREAKS != *"${cur:n-1:1}"* ]]; do ((n--)); done
    if ((n > 0)); then
        local strip=${cur:0:n}
        COMPREPLY=("${COMPREPLY[@]#"$strip"}")
    fi
}

complete -F _ocifuse ocifuse
