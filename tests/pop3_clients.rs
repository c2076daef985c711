mod support;
use std::time::{Duration, Instant};
use support::setup::*;

#[test]
fn explore() {
    let setup = Setup::start();
    setup.dovecot.fill(BOB.0, 40, 7);
    let info = format!(
        "GW_CA={}\nDV_CA={}\nPOP3S={}\nPOP3={}\nPLAIN={}\nDV={}\nMAILDIR={}\n",
        setup.pki.ca.display(),
        setup.dovecot.ca_pem().display(),
        setup.addr("pop3s").port(),
        setup.addr("pop3").port(),
        setup.addr("pop3-plain").port(),
        setup.dovecot.pop3s.port(),
        setup.dovecot.maildir("bob").display()
    );
    std::fs::write("/tmp/pe/env", info).unwrap();
    let _ = std::fs::remove_file("/tmp/pe/stop");
    let deadline = Instant::now() + Duration::from_secs(500);
    while Instant::now() < deadline && !std::path::Path::new("/tmp/pe/stop").exists() {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write("/tmp/pe/gw.log", setup.gateway.log()).unwrap();
}
