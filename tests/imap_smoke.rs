mod support;
use support::setup::*;

#[test]
fn login_select_fetch_through_the_gateway() {
    let setup = Setup::start();
    setup.dovecot.fill(ALICE.0, 5, 7);
    let mut c = setup.login(ALICE);
    let lines = c.command("a", "SELECT INBOX");
    assert!(lines.iter().any(|l| l == "* 5 EXISTS"), "{lines:?}");
    c.send(b"b UID FETCH 1 (BODY.PEEK[HEADER])\r\n");
    let first = c.line().unwrap();
    assert!(first.starts_with("* 1 FETCH"), "{first}");
    println!("{}", setup.gateway.log());
}
