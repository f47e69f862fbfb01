use chrono::TimeZone;

use super::*;

const POLICY: &str = r#"
[[rule]]
name = "default-erase"
action = "erase"

[[rule]]
name = "orders-anonymized"
categories = ["billing.order"]
action = "anonymize"

[[rule]]
name = "us-tax-7y"
regulations = ["ccpa", "vcdpa"]
categories = ["billing.invoice", "billing.order"]
action = "retain"
basis = "26 CFR §1.6001-1: tax records, 7 years"
period = "7y"
from = "request"

[[rule]]
name = "hgb-257-10y"
regulations = ["gdpr", "uk-gdpr"]
categories = ["billing.invoice"]
action = "retain"
basis = "HGB §257(4): invoices, 10 years"
period = "10y"

[[rule]]
name = "crm-marketing-anonymized"
systems = ["crm"]
categories = ["marketing.profile"]
action = "anonymize"

[[rule]]
name = "fraud-6m"
systems = ["billing"]
categories = ["identity.contact"]
regulations = ["gdpr"]
action = "retain"
basis = "GDPR Art. 17(3)(e): fraud investigation"
period = "6m"
from = "request"

[[rule]]
name = "fraud-2y"
systems = ["billing"]
categories = ["identity.contact"]
regulations = ["gdpr"]
action = "retain"
basis = "AML record keeping"
period = "2y"
from = "request"
"#;

fn policy() -> Policy {
    toml::from_str(POLICY).unwrap()
}

fn systems() -> Vec<SystemCategories> {
    let s = |name: &str, cats: &[&str]| SystemCategories {
        system: name.into(),
        categories: cats.iter().map(|c| (*c).to_owned()).collect(),
    };
    vec![
        s("billing", &["identity.contact", "billing.invoice", "billing.order"]),
        s("crm", &["identity.contact", "marketing.profile"]),
        s("analytics", &["analytics.events"]),
    ]
}

#[test]
fn the_most_protective_matching_rule_decides() {
    let p = policy();
    // (regulation, system, category, expected rule, expected action)
    let cases = [
        (Regulation::Gdpr, "billing", "billing.invoice", "hgb-257-10y", Action::Retain),
        (Regulation::UkGdpr, "billing", "billing.invoice", "hgb-257-10y", Action::Retain),
        (Regulation::Ccpa, "billing", "billing.invoice", "us-tax-7y", Action::Retain),
        (Regulation::Lgpd, "billing", "billing.invoice", "default-erase", Action::Erase),
        // retain beats anonymize beats erase
        (Regulation::Ccpa, "billing", "billing.order", "us-tax-7y", Action::Retain),
        (Regulation::Gdpr, "billing", "billing.order", "orders-anonymized", Action::Anonymize),
        (Regulation::Gdpr, "crm", "marketing.profile", "crm-marketing-anonymized", Action::Anonymize),
        (Regulation::Gdpr, "analytics", "analytics.events", "default-erase", Action::Erase),
        // of two retain rules, the longer period, whatever the order
        (Regulation::Gdpr, "billing", "identity.contact", "fraud-2y", Action::Retain),
        // a system filter does not leak into other systems
        (Regulation::Gdpr, "crm", "identity.contact", "default-erase", Action::Erase),
        (Regulation::Ccpa, "billing", "identity.contact", "default-erase", Action::Erase),
    ];
    for (reg, system, category, rule, action) in cases {
        let d = p.decide(reg, system, category).expect("decided");
        assert_eq!(d.rule.name, rule, "{reg} {system} {category}");
        assert_eq!(Action::from(d.rule.action), action, "{reg} {system} {category}");
    }
}

#[test]
fn a_hold_beats_every_rule_and_covers_only_its_scope() {
    let p = policy();
    let received = Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap();
    let hold = |systems: &[&str], categories: &[&str]| ActiveHold {
        hold: HoldRef { id: "h1".into(), reason: "dispute".into(), case_reference: "C-1".into() },
        scope: HoldScope {
            systems: systems.iter().map(|s| (*s).to_owned()).collect(),
            categories: categories.iter().map(|s| (*s).to_owned()).collect(),
        },
    };
    // (hold, system, category, expected action)
    let cases = [
        (hold(&[], &[]), "analytics", "analytics.events", Action::Hold),
        (hold(&["crm"], &[]), "crm", "marketing.profile", Action::Hold),
        (hold(&["crm"], &[]), "billing", "billing.order", Action::Anonymize),
        (hold(&[], &["billing.invoice"]), "billing", "billing.invoice", Action::Hold),
        (hold(&[], &["billing.invoice"]), "billing", "identity.contact", Action::Retain),
        (hold(&["crm"], &["identity.contact"]), "billing", "identity.contact", Action::Retain),
        (hold(&["crm"], &["identity.contact"]), "crm", "identity.contact", Action::Hold),
    ];
    for (h, system, category, action) in cases {
        let plan = p.plan(Regulation::Gdpr, received, &systems(), std::slice::from_ref(&h));
        let item = plan.iter().find(|i| i.system == system).unwrap();
        let c = item.categories.iter().find(|c| c.category == category).unwrap();
        assert_eq!(c.action, action, "{} {system} {category}", h.scope);
        // the rule underneath survives the hold, for when it is released
        assert_eq!(
            c.rule_action,
            Action::from(p.decide(Regulation::Gdpr, system, category).unwrap().rule.action)
        );
    }
    // The system's line names every category the hold keeps.
    let plan = p.plan(Regulation::Gdpr, received, &systems(), &[hold(&["crm"], &[])]);
    let crm = plan.iter().find(|i| i.system == "crm").unwrap();
    assert_eq!(crm.reason, "legal hold C-1 on identity.contact, marketing.profile");
}

#[test]
fn plans_carry_basis_and_end_dates_and_summarize_per_system() {
    let received = Utc.with_ymd_and_hms(2024, 2, 29, 10, 0, 0).unwrap();
    let plan = policy().plan(Regulation::Gdpr, received, &systems(), &[]);
    let billing = plan.iter().find(|i| i.system == "billing").unwrap();
    assert_eq!(billing.action, Action::Retain);
    let invoice = billing.categories.iter().find(|c| c.category == "billing.invoice").unwrap();
    assert_eq!(invoice.basis.as_deref(), Some("HGB §257(4): invoices, 10 years"));
    assert_eq!(invoice.reference, Some(Reference::Record));
    // leap day + 10 years clamps to 28 February
    assert_eq!(invoice.until, Some(Utc.with_ymd_and_hms(2034, 2, 28, 10, 0, 0).unwrap()));
    assert_eq!(billing.until, invoice.until, "the system line shows the latest end");
    let analytics = plan.iter().find(|i| i.system == "analytics").unwrap();
    assert_eq!(analytics.action, Action::Erase);
    assert_eq!(analytics.until, None);

    // The directive for an attempt ten years on: records dated before the
    // cutoff may go; the cutoff is the period back from the attempt.
    let as_of = Utc.with_ymd_and_hms(2034, 3, 1, 0, 0, 0).unwrap();
    let d = invoice.directive(as_of);
    assert_eq!(d.action, Action::Retain);
    assert_eq!(d.cutoff, Some(Utc.with_ymd_and_hms(2024, 3, 1, 0, 0, 0).unwrap()));
    assert_eq!(d.period, Some(Period::Months(120)));
    let erase = analytics.categories[0].directive(as_of);
    assert_eq!((erase.action, erase.basis, erase.cutoff, erase.until), (Action::Erase, None, None, None));
}

#[test]
fn an_undecided_category_or_unknown_system_is_rejected_by_name() {
    let p: Policy = toml::from_str(
        r#"
        [[rule]]
        name = "invoices"
        categories = ["billing.invoice"]
        action = "retain"
        basis = "HGB §257"
        period = "10y"

        [[rule]]
        name = "gdpr-erase"
        regulations = ["gdpr"]
        action = "erase"

        [[rule]]
        name = "typo"
        systems = ["bilings"]
        action = "erase"
        "#,
    )
    .unwrap();
    let err = p.check(&systems()).unwrap_err().to_string();
    assert!(err.contains("rule `typo` names unknown system `bilings`"), "{err}");
    assert!(
        err.contains(
            "category `analytics.events` of system `analytics` is decided by no rule under uk-gdpr, ccpa"
        ),
        "{err}"
    );
    assert!(!err.contains("`billing.invoice` of"), "invoices are decided everywhere: {err}");
    assert!(policy().check(&systems()).unwrap().is_empty());
}

#[test]
fn malformed_rules_are_rejected() {
    let cases = [
        (
            r#"[[rule]]
            name = "r"
            action = "retain"
            period = "10y""#,
            "gives no legal basis",
        ),
        (
            r#"[[rule]]
            name = "r"
            action = "retain"
            basis = "x""#,
            "gives no period",
        ),
        (
            r#"[[rule]]
            name = "r"
            action = "erase"
            period = "1y""#,
            "takes no period",
        ),
        (
            r#"[[rule]]
            name = "r"
            action = "erase"
            [[rule]]
            name = "r"
            action = "erase""#,
            "two rules are named `r`",
        ),
    ];
    for (text, expected) in cases {
        let p: Policy = toml::from_str(text).unwrap();
        let err = p.check(&systems()).unwrap_err().to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
    for bad in [
        "[[rule]]\nname = \"r\"\naction = \"delete\"",
        "[[rule]]\nname = \"r\"\naction = \"erase\"\nsystem = \"crm\"",
        "[[rule]]\nname = \"r\"\naction = \"retain\"\nbasis = \"x\"\nperiod = \"ten years\"",
        "[[rule]]\nname = \"r\"\naction = \"erase\"\nregulations = [\"hipaa\"]",
    ] {
        assert!(toml::from_str::<Policy>(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_category_no_system_holds_is_a_warning() {
    let mut p = policy();
    p.extend(
        toml::from_str("[[rule]]\nname = \"x\"\ncategories = [\"hr.payroll\"]\naction = \"erase\"").unwrap(),
    );
    let warnings = p.check(&systems()).unwrap();
    assert_eq!(warnings, vec!["rule `x` names category `hr.payroll`, which no system declares".to_owned()]);
}

/// A rule scoped to systems that do not hold its category decides nothing:
/// a retention meant for invoices, scoped to the wrong system, keeps none.
#[test]
fn a_category_none_of_the_rules_systems_holds_is_a_warning() {
    let mut p = policy();
    p.extend(
        toml::from_str(
            "[[rule]]\nname = \"crm-invoices\"\nsystems = [\"crm\"]\ncategories = [\"billing.invoice\"]\n\
             action = \"retain\"\nbasis = \"HGB\"\nperiod = \"10y\"",
        )
        .unwrap(),
    );
    let warnings = p.check(&systems()).unwrap();
    assert_eq!(
        warnings,
        vec![
            "rule `crm-invoices` names category `billing.invoice`, which none of its systems (crm) declares"
                .to_owned()
        ]
    );
}
