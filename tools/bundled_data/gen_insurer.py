"""Writer of the bundled insurer instruction data (lecture 000's insurance-chatbot example).

Northwind Mutual is an invented insurer. Its facts (deductibles, claim steps, hours, refunds...)
are fixed below, each with exactly one answer, so the data never contradicts itself: every way
of asking about a fact gets the same reply. Each fact also has several hand-written ways of
asking. One of them is held out for the evaluation set, so evaluation asks about *trained facts
in untrained words*. Answers are one to three short sentences, small enough for a tiny model.

Only ``make_bundled`` calls this module.
"""

from __future__ import annotations

import random

PHONE = "1-800-555-0142"  # 555-01xx numbers are reserved for fiction
EMAIL = "help@northwindmutual.example"  # .example is a reserved, never-registered domain

# fact name -> (answer, ways of asking). The last question of each fact is held out for eval.
FACTS: dict[str, tuple[str, list[str]]] = {
    "file_claim": (
        f"You can file a claim in the Northwind Mutual app, on our website, or by calling {PHONE} at any "
        "time.",
        ["How do I file a claim?", "How can I make a claim?", "Where do I report a claim?",
         "I need to make a claim. What do I do?", "Can I file a claim online?",
         "What are my options for submitting a claim?",
         "How do I open a new claim with you?", "I had an accident. How do I start a claim?",
         "What is the way to lodge a claim with Northwind Mutual?"]),
    "products": (
        "Northwind Mutual offers car, home, renters, travel and pet insurance.",
        ["What kinds of insurance do you sell?", "Which insurance products does Northwind Mutual offer?",
         "What types of policies can I buy from you?", "Do you only do car insurance?",
         "What can I insure with you?",
         "Which policies do you have?", "What insurance plans are available?",
         "Tell me what Northwind Mutual sells."]),
    "what_deductible": (
        "A deductible is the part of each claim that you pay yourself; Northwind Mutual pays the rest.",
        ["What is a deductible?", "What does deductible mean?", "Can you explain what a deductible is?",
         "I keep seeing the word deductible. What is it?", "What's a deductible in insurance?",
         "Define deductible for me, please.", "How does a deductible work?"]),
    "change_deductible": (
        "You can raise or lower your deductible in the app or by phone. A higher deductible lowers your "
        "premium.",
        ["Can I change my deductible?", "How do I lower my deductible?",
         "Is it possible to raise my deductible?",
         "I want a different deductible. Can I switch?", "Can the deductible on my policy be adjusted?",
         "Will a bigger deductible make my policy cheaper?", "How can I pick a new deductible?"]),
    "claim_deadline": (
        "Please report a claim within 30 days of the incident.",
        ["How long do I have to report a claim?", "Is there a deadline for filing a claim?",
         "How soon after an accident must I make a claim?", "What is the time limit for reporting a claim?",
         "Can I report a claim two months later?", "When is it too late to file a claim?",
         "How many days do I have to tell you about a claim?"]),
    "claim_documents": (
        "Upload photos of the damage and your receipts. For a theft, also add the police report number.",
        ["What documents do I need for a claim?", "What should I send with my claim?",
         "What evidence does a claim need?", "Do I need photos for my claim?",
         "What paperwork is required for a theft claim?",
         "Which files should I upload when I claim?", "What do I have to attach to a claim?"]),
    "claim_steps": (
        "First report the claim and upload photos and receipts. An adjuster contacts you within 2 business "
        "days, "
        "and you get a decision within 10 business days.",
        ["What are the steps of a claim?", "What happens after I file a claim?",
         "Walk me through the claims process.",
         "How does the claims process work?", "What should I expect once my claim is in?",
         "Can you explain the claim process step by step?", "What comes next after I submit a claim?"]),
    "adjuster_time": (
        "An adjuster will contact you within 2 business days of your claim.",
        ["When will an adjuster call me?", "How long until someone looks at my claim?",
         "How soon does an adjuster get in touch?", "When do I hear from the claims adjuster?",
         "How quickly will someone contact me about my claim?", "Who contacts me after I claim, and when?",
         "How many days before an adjuster reaches out?"]),
    "decision_time": (
        "Most claims are decided within 10 business days after we receive all documents.",
        ["How long does a claim decision take?", "When will I know if my claim is approved?",
         "How long until my claim is decided?", "How many days does it take to approve a claim?",
         "When do you make a decision on claims?", "How fast are claims decided?",
         "How long must I wait for a yes or no on my claim?"]),
    "claim_payment": (
        "Approved claims are paid by direct deposit within 5 business days.",
        ["When do I get paid after my claim is approved?", "How is an approved claim paid?",
         "How long does the payout take?", "How will I receive my claim money?",
         "My claim was approved. When does the money arrive?", "How quickly do you pay claims?",
         "When will the claim payment reach my account?"]),
    "claim_status": (
        "You can check the status of your claim in the app under My Claims, or by calling the claims line.",
        ["How do I check my claim status?", "Where can I see how my claim is going?",
         "How can I track my claim?",
         "Is there a way to follow my claim online?", "Where do I find updates on my claim?",
         "How do I know what stage my claim is at?", "Can I see the progress of my claim?"]),
    "claims_line": (
        f"The claims line, {PHONE}, is open 24 hours a day, 7 days a week.",
        ["Is the claims line open at night?", "When can I call about a claim?",
         "What are the claims line hours?",
         "Can I report a claim on the weekend?", "Is the claims phone line open all the time?",
         "Can I call about an accident at 3 in the morning?", "When is the claims hotline available?"]),
    "service_hours": (
        "Customer service is open Monday to Friday from 8 am to 8 pm, and Saturday from 9 am to 1 pm.",
        ["What are your opening hours?", "When is customer service open?",
         "What time does customer service open?",
         "What are your business hours?", "When can I talk to customer service?", "Are you open on Saturday?",
         "What hours can I reach your support team?", "When is your service desk staffed?"]),
    "sunday": (
        "Customer service is closed on Sundays, but the claims line is open 24 hours a day.",
        ["Are you open on Sunday?", "Can I call customer service on a Sunday?", "Is anyone there on Sundays?",
         "Do you work on Sundays?", "Is the office open on Sunday?", "Can I reach you on a Sunday?",
         "What if I need help on a Sunday?"]),
    "phone": (
        f"You can call us at {PHONE}.",
        ["What is your phone number?", "How do I call you?", "Which number should I call?",
         "Can I have your phone number?", "What number do I dial to reach Northwind Mutual?",
         "How can I reach you by phone?", "Give me the number for customer service."]),
    "email": (
        f"You can email us at {EMAIL}, and we reply within one business day.",
        ["What is your email address?", "Can I contact you by email?", "How do I email customer service?",
         "Where should I send an email?", "How fast do you answer emails?", "Do you have a support email?",
         "Can I write to you instead of calling?"]),
    "cancel_how": (
        "You can cancel at any time in the app or by phone. The policy ends at midnight on the date you "
        "choose.",
        ["How do I cancel my policy?", "Can I cancel my insurance?", "I want to cancel. What do I do?",
         "How can I end my policy?", "What is the process to cancel?",
         "Can I stop my policy whenever I want?",
         "When does my policy end if I cancel it?", "How do I terminate my coverage?"]),
    "cooling_off": (
        "If you cancel within 14 days of buying your policy, you get a full refund.",
        ["Is there a cooling-off period?", "Can I get all my money back if I change my mind?",
         "What if I cancel right after buying?", "Do I get a full refund if I cancel in the first week?",
         "I just bought a policy and regret it. Can I get a refund?", "How long do I have to change my mind?",
         "Is there a free cancellation window?"]),
    "cancel_fee": (
        "After the first 14 days, you get a refund for the unused part of your policy minus a $25 "
        "cancellation fee.",
        ["Is there a cancellation fee?", "How much does it cost to cancel?", "Do you charge a fee to cancel?",
         "What refund do I get if I cancel after a few months?", "Will I be charged for cancelling?",
         "What happens to my money if I cancel mid-year?", "Is cancelling free after the first two weeks?"]),
    "refund_time": (
        "Refunds are sent to your original payment method within 7 business days.",
        ["How long does a refund take?", "When will I get my refund?", "How will my refund be paid?",
         "Where does my refund go?", "How many days until my refund arrives?",
         "When is the refund processed?",
         "How do refunds work at Northwind Mutual?"]),
    "payment_options": (
        "You can pay monthly or once a year, by card or by bank transfer.",
        ["How can I pay for my policy?", "Can I pay monthly?", "What payment methods do you accept?",
         "Do I have to pay for the whole year at once?", "Can I pay by bank transfer?",
         "What are my billing options?",
         "Is paying by card possible?"]),
    "annual_discount": (
        "Paying for the whole year at once saves you 8 percent.",
        ["Is it cheaper to pay yearly?", "Do I save anything if I pay annually?",
         "What discount do I get for paying once a year?",
         "Is there a discount for paying in full?", "How much do I save with annual payment?",
         "Should I pay monthly or yearly to save money?", "Does paying up front cost less?"]),
    "late_payment": (
        "If a payment is late, you have a 15-day grace period. After 30 days unpaid, the policy is "
        "cancelled.",
        ["What happens if I miss a payment?", "Is there a grace period for late payments?",
         "What if my payment is late?",
         "Will my policy be cancelled if I pay late?", "How long can a payment be overdue?",
         "I forgot to pay this month. Am I still covered?", "When does an unpaid policy get cancelled?"]),
    "multi_policy": (
        "If you have both car and home insurance with us, you get 10 percent off both policies.",
        ["Do you have a bundle discount?", "Is there a discount for having car and home insurance?",
         "Can I save by combining policies?", "What is the multi-policy discount?",
         "Do I get money off if I insure my house and my car with you?", "Is bundling cheaper?",
         "Any discount for more than one policy?"]),
    "safe_driver": (
        "Drivers with no claims for 3 years get a 15 percent safe driver discount.",
        ["Do you offer a safe driver discount?", "Is there a discount for good drivers?",
         "I have never had an accident. Do I get a discount?",
         "How do I qualify for the safe driver discount?", "What discount do careful drivers get?",
         "Does a clean driving record lower my price?", "How much is the no-claims discount?"]),
    "alarm_discount": (
        "Installing a monitored alarm gives you 5 percent off your home policy.",
        ["Is there a discount for a home alarm?", "Do security systems lower my home premium?",
         "Will an alarm make my home insurance cheaper?", "What discount do I get for a burglar alarm?",
         "Does a monitored alarm save me money?", "Can home security reduce my price?",
         "I just installed an alarm. Do I get a discount?"]),
    "car_cover": (
        "Car insurance covers collision damage, theft, fire and your liability to other people.",
        ["What does car insurance cover?", "What is included in my car policy?",
         "What am I covered for with car insurance?",
         "Which risks does the car policy protect against?", "What does my auto policy include?",
         "Tell me what the car insurance pays for.",
         "What is covered under Northwind Mutual car insurance?"]),
    "roadside": (
        f"Roadside assistance is included with every car policy. Call {PHONE} if you break down.",
        ["Do you offer roadside assistance?", "My car broke down. Can you help?", "Is towing included?",
         "Does my car policy include breakdown help?", "Who do I call if my car won't start?",
         "Do I have to pay extra for roadside assistance?", "Is roadside help part of car insurance?"]),
    "rental_car": (
        "While your car is repaired after a covered claim, we pay for a rental car up to $40 a day for up to "
        "30 days.",
        ["Do you pay for a rental car?", "Will I get a replacement car while mine is repaired?",
         "Is a hire car covered after an accident?", "How much do you pay for a rental car?",
         "How long can I keep a rental car on my claim?", "Does my policy cover a loan car?",
         "Can I rent a car while mine is in the shop?"]),
    "windshield": (
        "Windshield chips are repaired with no deductible.",
        ["Do I pay a deductible for a windshield chip?", "Is windshield repair free?",
         "My windshield has a chip. What do I pay?",
         "Does a cracked windshield cost me anything?", "Is there a deductible on glass repair?",
         "Will fixing a stone chip affect my deductible?", "How much is a windshield repair for me?"]),
    "add_driver": (
        "You can add a driver in the app under My Policy, and the change takes effect straight away.",
        ["How do I add a driver?", "Can my partner drive my car on my policy?",
         "How can I add my son to my car insurance?",
         "Where do I add another driver?", "When does a new driver become covered?",
         "Can I put a second driver on my policy?",
         "I want my daughter insured on my car. How?"]),
    "home_cover": (
        "Home insurance covers fire, storms, theft and burst pipes.",
        ["What does home insurance cover?", "What is included in the home policy?",
         "What does my house insurance protect against?",
         "Which damage does home insurance pay for?", "What am I covered for with home insurance?",
         "Tell me what the home policy covers.",
         "What risks are included in Northwind Mutual home insurance?"]),
    "flood": (
        "Flood damage is not covered by the standard home policy, but you can add flood cover for an extra "
        "charge.",
        ["Does home insurance cover floods?", "Is flood damage covered?", "Am I insured if my house floods?",
         "My basement flooded after heavy rain. Am I covered?", "Can I get flood cover?",
         "Does the home policy include flooding?",
         "Will you pay for flood damage to my home?"]),
    "earthquake": (
        "Earthquake damage is not covered by Northwind Mutual home insurance.",
        ["Does home insurance cover earthquakes?", "Am I covered for earthquake damage?",
         "Is earthquake damage included?",
         "Can I claim for damage from an earthquake?", "What if an earthquake damages my house?",
         "Do you insure against earthquakes?", "Would my home policy pay after an earthquake?"]),
    "wear_tear": (
        "Normal wear and tear is not covered by any Northwind Mutual policy.",
        ["Is wear and tear covered?", "Can I claim for an old roof that wore out?",
         "Do you pay for things that wear out over time?",
         "Is ageing damage covered?", "Will you replace a worn-out carpet?",
         "Does insurance cover normal wear?",
         "My fence rotted with age. Can I claim?"]),
    "renters": (
        "Renters insurance covers your belongings up to $30,000 and includes liability cover.",
        ["What does renters insurance cover?", "How much does renters insurance pay for my things?",
         "I rent an apartment. What would your policy cover?", "What is the limit on renters insurance?",
         "Does renters insurance include liability?", "What is included in a renters policy?",
         "How much are my belongings insured for as a tenant?"]),
    "travel": (
        "Travel insurance covers trip cancellation, lost luggage up to $2,000 and emergency medical costs up "
        "to $100,000.",
        ["What does travel insurance cover?", "Is lost luggage covered?",
         "Does travel insurance pay for a doctor abroad?",
         "What is included in the travel policy?", "How much do you pay for lost bags?",
         "Am I covered if I have to cancel my trip?", "What are the limits on travel insurance?"]),
    "pet_cover": (
        "Pet insurance covers accidents and illnesses, but not conditions your pet had before the policy "
        "started.",
        ["What does pet insurance cover?", "Are pre-existing conditions covered for my dog?",
         "Does pet insurance cover illness?",
         "Is my cat covered for an old injury?", "What is included in the pet policy?",
         "Will you pay vet bills for accidents?",
         "Does pet insurance cover problems my pet already had?"]),
    "pet_waiting": (
        "There is a 14-day waiting period for illness claims on a new pet policy. Accidents are covered from "
        "the first day.",
        ["Is there a waiting period for pet insurance?", "When does my pet's cover start?",
         "Can I claim for my dog straight away?",
         "How long before my new pet policy covers illness?",
         "Are accidents covered immediately on pet insurance?",
         "My puppy got sick a week after I bought the policy. Am I covered?",
         "How soon can I make a pet claim?"]),
    "policy_number": (
        "Your policy number starts with NM followed by 8 digits. It is in your welcome email and in the app.",
        ["Where do I find my policy number?", "What does my policy number look like?",
         "I lost my policy number. Where is it?",
         "How can I look up my policy number?", "Where is the policy number printed?",
         "What format is a policy number?",
         "Where can I see my policy number?"]),
    "proof": (
        "You can download your insurance card from the app at any time.",
        ["How do I get proof of insurance?", "Where is my insurance card?",
         "I need proof that I'm insured. How?",
         "Can I get a copy of my insurance card?", "How can I show that I have insurance?",
         "Where can I download my insurance certificate?",
         "The police asked for my insurance card. Where do I get it?"]),
    "moving": (
        "Please update your address in the app within 30 days of moving.",
        ["I'm moving house. What should I do?", "How do I change my address?",
         "Do I need to tell you when I move?",
         "Where do I update my address?", "I have a new address. How do I let you know?",
         "How soon must I report a new address?", "What happens to my policy if I move?"]),
    "complaints": (
        "Send your complaint through the app or by email, and our complaints team will respond within 5 "
        "business days.",
        ["How do I make a complaint?", "I'm unhappy with my service. Who do I tell?",
         "Where can I send a complaint?",
         "How long do you take to answer complaints?", "Can I complain about how my claim was handled?",
         "Who handles complaints?", "What is the complaints process?"]),
    "quote": (
        "You can get a quote in about five minutes on our website or in the app.",
        ["How do I get a quote?", "Can I get a price for insurance?", "How long does a quote take?",
         "Where can I see how much a policy would cost?", "I want to know the price of car insurance. How?",
         "Can I get an online quote?", "How can I find out what my premium would be?"]),
    "premium": (
        "A premium is the amount you pay for your policy, either monthly or once a year.",
        ["What is a premium?", "What does premium mean?", "Can you explain the word premium?",
         "What does the word premium mean on my bill?", "What am I paying when I pay my premium?",
         "Define premium, please.", "What's an insurance premium?"]),
    "start_date": (
        "A new policy can start the day after you buy it, or on any date within the next 60 days.",
        ["When does my new policy start?", "Can I choose my policy start date?",
         "How soon can my cover begin?",
         "Can I buy a policy now that starts next month?", "How far ahead can I set a start date?",
         "Does cover start the moment I buy?", "When will my insurance become active?"]),
    "who_are_you": (
        "I am the virtual assistant of Northwind Mutual. I can answer questions about policies, claims and "
        "billing.",
        ["Who are you?", "What are you?", "What can you help me with?", "Am I talking to a person?",
         "Are you a bot?", "What kind of questions can you answer?", "What do you do?"]),
}

# Deductibles: one fact per product, shared question wordings.
DEDUCTIBLES = {
    "car": "The standard deductible on a car policy is $500 per claim.",
    "home": "The standard deductible on a home policy is $1,000 per claim.",
    "renters": "The deductible on a renters policy is $250 per claim.",
    "travel": "The deductible on a travel policy is $50 per trip.",
    "pet": "The deductible on a pet policy is $100 per policy year.",
}
DEDUCTIBLE_QUESTIONS = [
    "What is the deductible for {p} insurance?", "How much is the {p} deductible?",
    "What's the deductible on a {p} policy?", "How much do I pay myself on a {p} claim?",
    "Tell me the {p} insurance deductible.", "If I make a {p} claim, what deductible applies?",
    "What deductible comes with {p} cover?", "How big is the deductible on {p} insurance?",
]
EVAL_DEDUCTIBLE_QUESTION = "I have {p} insurance. What deductible do I pay?"

TASKS = [  # instructions of records that put the customer's question in "input"
    "Answer the customer's question about their Northwind Mutual policy.",
    "You are a Northwind Mutual support agent. Reply to this message.",
    "Respond to the following customer question.",
    "Give a short, accurate answer to this insurance question.",
    "A customer wrote in. Answer them.",
]
GREETINGS = ["", "", "", "Hi! ", "Hello. ", "Quick question: ", "Good morning. ", "Hey there. "]
CHAT_SYSTEM = "You are a helpful assistant for Northwind Mutual customers. Keep answers short."


def all_facts() -> dict[str, tuple[str, list[str]]]:
    """Every fact -> (answer, questions), the deductibles expanded per product; eval question last."""
    facts = dict(FACTS)
    for product, answer in DEDUCTIBLES.items():
        questions = [q.format(p=product) for q in DEDUCTIBLE_QUESTIONS]
        facts[f"deductible_{product}"] = (answer, [*questions, EVAL_DEDUCTIBLE_QUESTION.format(p=product)])
    return facts


def _single(rng: random.Random, question: str, answer: str) -> dict:
    """One training record for one question, in one of the three shapes."""
    question = rng.choice(GREETINGS) + question
    shape = rng.random()
    if shape < 0.55:
        return {"instruction": question, "input": "", "output": answer}
    if shape < 0.9:
        return {"instruction": rng.choice(TASKS), "input": question, "output": answer}
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": CHAT_SYSTEM})
    return {"messages": messages}


def _conversation(rng: random.Random, first: tuple[str, str], second: tuple[str, str]) -> dict:
    """A two-question chat: both assistant turns are learned (every assistant turn is a target)."""
    follow = rng.choice(["Thanks. ", "Got it. ", "OK. ", "One more thing: ", "Another question: "])
    return {"messages": [{"role": "user", "content": first[0]}, {"role": "assistant", "content": first[1]},
                         {"role": "user", "content": follow + second[0]}, {"role": "assistant",
                                                                           "content": second[1]}]}


def insurer_records(rng: random.Random, max_chars: int = 220, conversations: int = 24):
    """-> (train records, eval records).

    Train: every question of every fact except its last, plus the personalised deductible
    records and ``conversations`` two-turn chats. Eval: the last (held-out) question of each fact.
    ``max_chars`` bounds the text of a two-turn chat so that, with the ChatML markup and a system
    prompt of up to ~90 characters, it stays within 384 byte tokens (the demo model's context).
    """
    facts = all_facts()
    train, pairs = [], []
    for answer, questions in facts.values():
        for q in questions[:-1]:
            train.append(_single(rng, q, answer))
            pairs.append((q, answer))
    for product, answer in DEDUCTIBLES.items():
        train.append({"instruction": "What is my deductible?", "input": f"Policy type: {product} insurance",
                      "output": answer})
    while conversations:
        first, second = rng.sample(pairs, 2)
        if first[1] != second[1] and sum(len(t) for t in (*first, *second)) <= max_chars:
            train.append(_conversation(rng, first, second))
            conversations -= 1
    rng.shuffle(train)
    evals = [{"instruction": questions[-1], "input": "",
              "output": answer} for answer, questions in facts.values()]
    return train, evals
