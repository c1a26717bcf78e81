#!/usr/bin/env bash
# Install mlxd as a per-user service: a launchd LaunchAgent on macOS, a systemd user unit on Linux.
# Written for bash 3.2 too (macOS's /bin/bash).
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true # bash >= 5.2: keep "&" literal in ${x//a/b}

usage() {
    cat <<'USAGE'
Usage: deploy/install.sh [--dry-run] [--bin PATH] [--os macos|linux] [--uninstall]

Installs mlxd as a per-user service that starts at login and serves http://127.0.0.1:8080/v1.
  macOS  ~/Library/LaunchAgents/dev.mlxd.server.plist (launchd); log: ~/Library/Logs/mlxd/mlxd.log
  Linux  ~/.config/systemd/user/mlxd.service (systemd --user); log: journalctl --user -u mlxd

  --bin PATH   the mlxd executable (default: this repository's .venv/bin/mlxd, else mlxd on PATH)
  --os NAME    macos or linux (default: this machine's)
  --dry-run    print the file and the commands instead of running them
  --uninstall  stop the service and remove its file
USAGE
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dry_run=0
uninstall=0
bin=""
os=""
while (($#)); do
    case $1 in
    --dry-run) dry_run=1 ;;
    --uninstall) uninstall=1 ;;
    --bin) [[ $# -ge 2 ]] || die "--bin needs a path"; bin=$2; shift ;;
    --bin=*) bin=${1#*=} ;;
    --os) [[ $# -ge 2 ]] || die "--os needs macos or linux"; os=$2; shift ;;
    --os=*) os=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [[ -z $os ]]; then
    case $(uname -s) in
    Darwin) os=macos ;;
    Linux) os=linux ;;
    *) die "no service template for $(uname -s); use --os macos or --os linux" ;;
    esac
fi
[[ $os == macos || $os == linux ]] || die "--os must be macos or linux, not $os"

# Run a command, or only show it under --dry-run.
run() {
    if ((dry_run)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# Write stdin to a file, or show it under --dry-run.
write() {
    if ((dry_run)); then
        echo "+ write $1:"
        cat
    else
        cat >"$1"
    fi
}

find_bin() {
    if [[ -z $bin ]]; then
        if [[ -x $here/../.venv/bin/mlxd ]]; then
            bin=$here/../.venv/bin/mlxd
        elif command -v mlxd >/dev/null; then
            bin=$(command -v mlxd)
        else
            die "mlxd is not installed: run 'make install' in the repository, or pass --bin PATH"
        fi
    fi
    if [[ -x $bin && ! -d $bin ]]; then
        bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
    elif ((dry_run)); then
        echo "install.sh: warning: $bin is not an executable file" >&2
    else
        die "$bin is not an executable file"
    fi
}

xml_escape() {
    local s=${1//&/&amp;}
    s=${s//</&lt;}
    printf '%s' "${s//>/&gt;}"
}

# A path as systemd reads it in ExecStart: %h for the home directory, % doubled, quoted if needed.
systemd_path() {
    local path=${1//\%/%%} home=${HOME//\%/%%}
    if [[ $path == "$home"/* ]]; then
        path=%h/${path#"$home"/}
    fi
    if [[ $path == *[[:space:]\"\\]* ]]; then
        path=${path//\\/\\\\}
        path=\"${path//\"/\\\"}\"
    fi
    printf '%s' "$path"
}

install_macos() {
    local label=dev.mlxd.server domain
    local agents=$HOME/Library/LaunchAgents logs=$HOME/Library/Logs/mlxd
    local target=$agents/$label.plist
    domain=gui/$(id -u)
    if ((uninstall)); then
        run launchctl bootout "$domain/$label" || true
        run rm -f "$target"
        return
    fi
    find_bin
    local text
    text=$(<"$here/macos/$label.plist")
    text=${text//__MLXD_BIN__/$(xml_escape "$bin")}
    text=${text//__HOME__/$(xml_escape "$HOME")}
    run mkdir -p "$agents" "$logs"
    printf '%s\n' "$text" | write "$target"
    if command -v plutil >/dev/null; then
        run plutil -lint "$target"
    fi
    run launchctl bootout "$domain/$label" 2>/dev/null || true # replace a running one
    run launchctl bootstrap "$domain" "$target"
    echo "mlxd: installed $target"
    echo "  log:    $logs/mlxd.log"
    echo "  status: launchctl print $domain/$label"
}

install_linux() {
    local units=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
    local target=$units/mlxd.service default_bin='%h/mlxd/.venv/bin/mlxd'
    if ((uninstall)); then
        run systemctl --user disable --now mlxd.service || true
        run rm -f "$target"
        run systemctl --user daemon-reload
        return
    fi
    find_bin
    local text
    text=$(<"$here/linux/mlxd.service")
    text=${text//"$default_bin"/$(systemd_path "$bin")}
    run mkdir -p "$units"
    printf '%s\n' "$text" | write "$target"
    run systemctl --user daemon-reload
    run systemctl --user enable mlxd.service
    run systemctl --user restart mlxd.service # start, or pick up a changed unit
    echo "mlxd: installed $target"
    echo "  log:    journalctl --user -u mlxd -f"
    echo "  status: systemctl --user status mlxd"
}

"install_$os"
