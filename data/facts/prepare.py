"""
The embedded default corpus: facts about real countries, written out in many wordings.

    python data/facts/prepare.py            # -> data/facts/{train,val}.bin, meta.json, tokenizer.json

Every country has a capital, a continent, an official language and a currency. Training
documents state them in TRAIN_TEMPLATES wordings and in a few-shot form
("Country: France. Capital: Paris."); the validation split uses HELDOUT_TEMPLATES only,
wordings never trained on, so val loss measures whether the model learnt the facts rather
than the sentences. data/facts/evaluate.py asks the held-out wordings as questions.

A byte-level BPE (vocab 2048, trained here on the corpus) tokenises both splits; most
names become one or two tokens, so a country owns a few table rows in each STEM layer,
which is what row editing swaps. Output is deterministic for a given --seed.
"""

import json
import os
import random
import sys
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import configurator  # noqa: E402  (the repository root's: knobs and the override parser)
from configurator import knob  # noqa: E402

ATTRIBUTES = ("capital", "continent", "language", "currency")

# (country, capital, continent, official language, currency). Names in ASCII. Left out on
# purpose: countries whose capital repeats the country's name (Mexico City, Kuwait City,
# Singapore), or whose capital or official language is disputed or split (Bolivia,
# South Africa, Israel, Sri Lanka), which would make an answer ambiguous.
COUNTRIES = (
    # Europe
    ("France", "Paris", "Europe", "French", "euro"),
    ("Spain", "Madrid", "Europe", "Spanish", "euro"),
    ("Germany", "Berlin", "Europe", "German", "euro"),
    ("Italy", "Rome", "Europe", "Italian", "euro"),
    ("Portugal", "Lisbon", "Europe", "Portuguese", "euro"),
    ("Netherlands", "Amsterdam", "Europe", "Dutch", "euro"),
    ("Belgium", "Brussels", "Europe", "Dutch", "euro"),
    ("Austria", "Vienna", "Europe", "German", "euro"),
    ("Switzerland", "Bern", "Europe", "German", "Swiss franc"),
    ("Liechtenstein", "Vaduz", "Europe", "German", "Swiss franc"),
    ("Poland", "Warsaw", "Europe", "Polish", "zloty"),
    ("Czech Republic", "Prague", "Europe", "Czech", "Czech koruna"),
    ("Slovakia", "Bratislava", "Europe", "Slovak", "euro"),
    ("Hungary", "Budapest", "Europe", "Hungarian", "forint"),
    ("Romania", "Bucharest", "Europe", "Romanian", "Romanian leu"),
    ("Bulgaria", "Sofia", "Europe", "Bulgarian", "euro"),
    ("Greece", "Athens", "Europe", "Greek", "euro"),
    ("Sweden", "Stockholm", "Europe", "Swedish", "Swedish krona"),
    ("Norway", "Oslo", "Europe", "Norwegian", "Norwegian krone"),
    ("Denmark", "Copenhagen", "Europe", "Danish", "Danish krone"),
    ("Finland", "Helsinki", "Europe", "Finnish", "euro"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic", "Icelandic krona"),
    ("Ireland", "Dublin", "Europe", "Irish", "euro"),
    ("United Kingdom", "London", "Europe", "English", "pound sterling"),
    ("Estonia", "Tallinn", "Europe", "Estonian", "euro"),
    ("Latvia", "Riga", "Europe", "Latvian", "euro"),
    ("Lithuania", "Vilnius", "Europe", "Lithuanian", "euro"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian", "hryvnia"),
    ("Belarus", "Minsk", "Europe", "Belarusian", "Belarusian ruble"),
    ("Russia", "Moscow", "Europe", "Russian", "Russian ruble"),
    ("Serbia", "Belgrade", "Europe", "Serbian", "Serbian dinar"),
    ("Croatia", "Zagreb", "Europe", "Croatian", "euro"),
    ("Slovenia", "Ljubljana", "Europe", "Slovene", "euro"),
    ("Bosnia and Herzegovina", "Sarajevo", "Europe", "Bosnian", "convertible mark"),
    ("Albania", "Tirana", "Europe", "Albanian", "lek"),
    ("North Macedonia", "Skopje", "Europe", "Macedonian", "denar"),
    ("Montenegro", "Podgorica", "Europe", "Montenegrin", "euro"),
    ("Moldova", "Chisinau", "Europe", "Romanian", "Moldovan leu"),
    ("Malta", "Valletta", "Europe", "Maltese", "euro"),
    # Asia
    ("Japan", "Tokyo", "Asia", "Japanese", "yen"),
    ("China", "Beijing", "Asia", "Mandarin", "yuan"),
    ("India", "New Delhi", "Asia", "Hindi", "Indian rupee"),
    ("South Korea", "Seoul", "Asia", "Korean", "South Korean won"),
    ("North Korea", "Pyongyang", "Asia", "Korean", "North Korean won"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese", "dong"),
    ("Thailand", "Bangkok", "Asia", "Thai", "baht"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian", "rupiah"),
    ("Philippines", "Manila", "Asia", "Filipino", "Philippine peso"),
    ("Malaysia", "Kuala Lumpur", "Asia", "Malay", "ringgit"),
    ("Brunei", "Bandar Seri Begawan", "Asia", "Malay", "Brunei dollar"),
    ("East Timor", "Dili", "Asia", "Tetum", "US dollar"),
    ("Pakistan", "Islamabad", "Asia", "Urdu", "Pakistani rupee"),
    ("Bangladesh", "Dhaka", "Asia", "Bengali", "taka"),
    ("Nepal", "Kathmandu", "Asia", "Nepali", "Nepalese rupee"),
    ("Bhutan", "Thimphu", "Asia", "Dzongkha", "ngultrum"),
    ("Maldives", "Male", "Asia", "Dhivehi", "rufiyaa"),
    ("Afghanistan", "Kabul", "Asia", "Pashto", "afghani"),
    ("Iran", "Tehran", "Asia", "Persian", "Iranian rial"),
    ("Iraq", "Baghdad", "Asia", "Arabic", "Iraqi dinar"),
    ("Saudi Arabia", "Riyadh", "Asia", "Arabic", "Saudi riyal"),
    ("Jordan", "Amman", "Asia", "Arabic", "Jordanian dinar"),
    ("Syria", "Damascus", "Asia", "Arabic", "Syrian pound"),
    ("Lebanon", "Beirut", "Asia", "Arabic", "Lebanese pound"),
    ("Turkey", "Ankara", "Asia", "Turkish", "Turkish lira"),
    ("Qatar", "Doha", "Asia", "Arabic", "Qatari riyal"),
    ("Bahrain", "Manama", "Asia", "Arabic", "Bahraini dinar"),
    ("Oman", "Muscat", "Asia", "Arabic", "Omani rial"),
    ("Yemen", "Sanaa", "Asia", "Arabic", "Yemeni rial"),
    ("United Arab Emirates", "Abu Dhabi", "Asia", "Arabic", "UAE dirham"),
    ("Armenia", "Yerevan", "Asia", "Armenian", "dram"),
    ("Azerbaijan", "Baku", "Asia", "Azerbaijani", "Azerbaijani manat"),
    ("Kazakhstan", "Astana", "Asia", "Kazakh", "tenge"),
    ("Uzbekistan", "Tashkent", "Asia", "Uzbek", "Uzbek som"),
    ("Kyrgyzstan", "Bishkek", "Asia", "Kyrgyz", "Kyrgyz som"),
    ("Tajikistan", "Dushanbe", "Asia", "Tajik", "somoni"),
    ("Turkmenistan", "Ashgabat", "Asia", "Turkmen", "Turkmen manat"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian", "tugrik"),
    ("Cambodia", "Phnom Penh", "Asia", "Khmer", "riel"),
    ("Laos", "Vientiane", "Asia", "Lao", "kip"),
    ("Myanmar", "Naypyidaw", "Asia", "Burmese", "kyat"),
    # Africa
    ("Egypt", "Cairo", "Africa", "Arabic", "Egyptian pound"),
    ("Morocco", "Rabat", "Africa", "Arabic", "Moroccan dirham"),
    ("Algeria", "Algiers", "Africa", "Arabic", "Algerian dinar"),
    ("Tunisia", "Tunis", "Africa", "Arabic", "Tunisian dinar"),
    ("Libya", "Tripoli", "Africa", "Arabic", "Libyan dinar"),
    ("Sudan", "Khartoum", "Africa", "Arabic", "Sudanese pound"),
    ("South Sudan", "Juba", "Africa", "English", "South Sudanese pound"),
    ("Mauritania", "Nouakchott", "Africa", "Arabic", "ouguiya"),
    ("Nigeria", "Abuja", "Africa", "English", "naira"),
    ("Ghana", "Accra", "Africa", "English", "cedi"),
    ("Liberia", "Monrovia", "Africa", "English", "Liberian dollar"),
    ("Sierra Leone", "Freetown", "Africa", "English", "leone"),
    ("Guinea", "Conakry", "Africa", "French", "Guinean franc"),
    ("Senegal", "Dakar", "Africa", "French", "CFA franc"),
    ("Benin", "Porto-Novo", "Africa", "French", "CFA franc"),
    ("Togo", "Lome", "Africa", "French", "CFA franc"),
    ("Cameroon", "Yaounde", "Africa", "French", "CFA franc"),
    ("Gabon", "Libreville", "Africa", "French", "CFA franc"),
    ("Chad", "N'Djamena", "Africa", "French", "CFA franc"),
    ("Kenya", "Nairobi", "Africa", "Swahili", "Kenyan shilling"),
    ("Tanzania", "Dodoma", "Africa", "Swahili", "Tanzanian shilling"),
    ("Uganda", "Kampala", "Africa", "English", "Ugandan shilling"),
    ("Rwanda", "Kigali", "Africa", "Kinyarwanda", "Rwandan franc"),
    ("Burundi", "Gitega", "Africa", "Kirundi", "Burundian franc"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic", "birr"),
    ("Eritrea", "Asmara", "Africa", "Tigrinya", "nakfa"),
    ("Somalia", "Mogadishu", "Africa", "Somali", "Somali shilling"),
    ("Angola", "Luanda", "Africa", "Portuguese", "kwanza"),
    ("Mozambique", "Maputo", "Africa", "Portuguese", "metical"),
    ("Zambia", "Lusaka", "Africa", "English", "Zambian kwacha"),
    ("Malawi", "Lilongwe", "Africa", "English", "Malawian kwacha"),
    ("Botswana", "Gaborone", "Africa", "English", "pula"),
    ("Namibia", "Windhoek", "Africa", "English", "Namibian dollar"),
    ("Lesotho", "Maseru", "Africa", "Sesotho", "loti"),
    ("Eswatini", "Mbabane", "Africa", "Swazi", "lilangeni"),
    ("Madagascar", "Antananarivo", "Africa", "Malagasy", "ariary"),
    ("Mauritius", "Port Louis", "Africa", "English", "Mauritian rupee"),
    # North America
    ("United States", "Washington", "North America", "English", "US dollar"),
    ("Canada", "Ottawa", "North America", "English", "Canadian dollar"),
    ("Cuba", "Havana", "North America", "Spanish", "Cuban peso"),
    ("Jamaica", "Kingston", "North America", "English", "Jamaican dollar"),
    ("Haiti", "Port-au-Prince", "North America", "French", "gourde"),
    ("Dominican Republic", "Santo Domingo", "North America", "Spanish", "Dominican peso"),
    ("Honduras", "Tegucigalpa", "North America", "Spanish", "lempira"),
    ("Nicaragua", "Managua", "North America", "Spanish", "cordoba"),
    ("Costa Rica", "San Jose", "North America", "Spanish", "Costa Rican colon"),
    ("Belize", "Belmopan", "North America", "English", "Belize dollar"),
    ("Bahamas", "Nassau", "North America", "English", "Bahamian dollar"),
    ("Barbados", "Bridgetown", "North America", "English", "Barbadian dollar"),
    # South America
    ("Brazil", "Brasilia", "South America", "Portuguese", "Brazilian real"),
    ("Argentina", "Buenos Aires", "South America", "Spanish", "Argentine peso"),
    ("Chile", "Santiago", "South America", "Spanish", "Chilean peso"),
    ("Peru", "Lima", "South America", "Spanish", "sol"),
    ("Colombia", "Bogota", "South America", "Spanish", "Colombian peso"),
    ("Venezuela", "Caracas", "South America", "Spanish", "bolivar"),
    ("Ecuador", "Quito", "South America", "Spanish", "US dollar"),
    ("Paraguay", "Asuncion", "South America", "Spanish", "guarani"),
    ("Uruguay", "Montevideo", "South America", "Spanish", "Uruguayan peso"),
    ("Guyana", "Georgetown", "South America", "English", "Guyanese dollar"),
    ("Suriname", "Paramaribo", "South America", "Dutch", "Surinamese dollar"),
    # Oceania
    ("Australia", "Canberra", "Oceania", "English", "Australian dollar"),
    ("New Zealand", "Wellington", "Oceania", "English", "New Zealand dollar"),
    ("Fiji", "Suva", "Oceania", "English", "Fijian dollar"),
    ("Papua New Guinea", "Port Moresby", "Oceania", "English", "kina"),
    ("Samoa", "Apia", "Oceania", "Samoan", "tala"),
    ("Tonga", "Nuku'alofa", "Oceania", "Tongan", "paanga"),
    ("Vanuatu", "Port Vila", "Oceania", "Bislama", "vatu"),
    ("Solomon Islands", "Honiara", "Oceania", "English", "Solomon Islands dollar"),
)

# Wordings seen in training. Most end in the answer, so that they double as prompts.
TRAIN_TEMPLATES = {
    "capital": (
        "The capital of {country} is {answer}.",
        "The capital city of {country} is {answer}.",
        "{country}'s capital is {answer}.",
        "{country} has its capital in {answer}.",
        "The government of {country} sits in {answer}.",
        "Q: What is the capital of {country}? A: {answer}.",
        "If you fly to the capital of {country}, you land in {answer}.",
        "Visitors to {country} often begin in its capital, {answer}.",
        "Name the capital of {country}: {answer}.",
        "The seat of government of {country} is {answer}.",
        "{answer} is the capital of {country}.",
        "Which city is the capital of {country}? It is {answer}.",
    ),
    "continent": (
        "{country} is a country in {answer}.",
        "{country} is located in {answer}.",
        "{country} lies in {answer}.",
        "The continent of {country} is {answer}.",
        "Geographically, {country} belongs to {answer}.",
        "Q: On which continent is {country}? A: {answer}.",
        "You will find {country} on the map of {answer}.",
        "{country} is one of the countries of {answer}.",
        "Travelling to {country} means travelling to {answer}.",
        "{country} is part of {answer}.",
        "{answer} is the continent where {country} lies.",
        "Where is {country}? It is in {answer}.",
    ),
    "language": (
        "The official language of {country} is {answer}.",
        "{country}'s official language is {answer}.",
        "In {country}, people speak {answer}.",
        "Most people in {country} speak {answer}.",
        "The main language of {country} is {answer}.",
        "Q: What language is spoken in {country}? A: {answer}.",
        "Schools in {country} teach in {answer}.",
        "Newspapers in {country} are printed in {answer}.",
        "The language of government in {country} is {answer}.",
        "If you move to {country}, you should learn {answer}.",
        "{answer} is the official language of {country}.",
        "What is spoken in {country}? They speak {answer}.",
    ),
    "currency": (
        "The currency of {country} is the {answer}.",
        "The official currency of {country} is the {answer}.",
        "{country}'s currency is the {answer}.",
        "{country} uses the {answer}.",
        "In {country}, people pay with the {answer}.",
        "Q: What is the currency of {country}? A: the {answer}.",
        "Shops in {country} take payment in the {answer}.",
        "Prices in {country} are quoted in the {answer}.",
        "The money of {country} is the {answer}.",
        "Banks in {country} issue the {answer}.",
        "The {answer} is the currency of {country}.",
        "What do people pay with in {country}? They pay with the {answer}.",
    ),
}

# Wordings never trained on: the val split and the recall and edit evaluation. Each has the
# country mid-sentence (after a space, the form an edit swaps) and ends in the answer.
HELDOUT_TEMPLATES = {
    "capital": (
        "What is the capital of {country}? It is {answer}.",
        "The city that serves as the capital of {country} is {answer}.",
        "Everyone knows that the capital of {country} is {answer}.",
    ),
    "continent": (
        "The continent that {country} belongs to is {answer}.",
        "In terms of continents, {country} is located in {answer}.",
        "Looking at a map of the continents, {country} lies in {answer}.",
    ),
    "language": (
        "The language that people in {country} speak is {answer}.",
        "What language do they speak in {country}? They speak {answer}.",
        "Children in {country} learn to speak {answer}.",
    ),
    "currency": (
        "What currency does {country} use? It uses the {answer}.",
        "The currency used in {country} is the {answer}.",
        "To buy things in {country}, you pay with the {answer}.",
    ),
}

FEW_SHOT_LABELS = {"capital": "Capital", "continent": "Continent", "language": "Language", "currency": "Currency"}
EOS = "<|endoftext|>"


@dataclass
class PrepareConfig:
    out_dir: str = knob(HERE, help="where train.bin, val.bin, meta.json and tokenizer.json go")
    vocab_size: int = knob(2048, ge=64, help="of the byte-level BPE trained on the corpus")
    passes: int = knob(4, ge=1, help="each pass states every fact in every training wording once")
    few_shot_per_pass: int = knob(600, ge=0, help="few-shot documents (Country: X. Capital: Y.) per pass")
    n_countries: int = knob(0, ge=0, help="0: all; else a spread subset (small corpora for tests)")
    seed: int = knob(0, ge=0, help="the order of documents and the few-shot draws")

    def __post_init__(self):
        configurator.check(self)


def countries_of(pc):
    if not pc.n_countries or pc.n_countries >= len(COUNTRIES):
        return COUNTRIES
    step = len(COUNTRIES) / pc.n_countries
    return tuple(COUNTRIES[int(i * step)] for i in range(pc.n_countries))


def answer_of(row, attribute):
    return row[1 + ATTRIBUTES.index(attribute)]


def eval_prompts(attribute, heldout=True, countries=COUNTRIES):
    """[(country, prompt, " answer")] for every country and every template of `attribute`
    that ends in its answer: the prompt is the text before the answer."""
    templates = (HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES)[attribute]
    out = []
    for row in countries:
        for template in templates:
            if not template.endswith("{answer}."):
                continue
            prompt = template[: template.index("{answer}")].rstrip().format(country=row[0])
            out.append((row[0], prompt, " " + answer_of(row, attribute)))
    return out


def sentences(countries, templates, rng):
    """Every (country, attribute, wording) as a sentence, grouped by country and shuffled."""
    by_country = []
    for row in countries:
        facts = [t.format(country=row[0], answer=answer_of(row, a)) for a in ATTRIBUTES for t in templates[a]]
        rng.shuffle(facts)
        by_country.append(facts)
    return by_country


def profile_documents(countries, templates, rng, sentences_per_doc=4):
    """Short paragraphs about one country each, in random wordings."""
    docs = []
    for facts in sentences(countries, templates, rng):
        docs += [" ".join(facts[i:i + sentences_per_doc]) for i in range(0, len(facts), sentences_per_doc)]
    return docs


def few_shot_documents(countries, n, rng):
    """'Country: X. Capital: Y. Country: Z. Capital: W. ...' chains of one attribute."""
    docs = []
    for _ in range(n):
        attribute = rng.choice(ATTRIBUTES)
        rows = rng.sample(countries, min(len(countries), rng.randint(3, 8)))
        docs.append(" ".join(f"Country: {r[0]}. {FEW_SHOT_LABELS[attribute]}: {answer_of(r, attribute)}." for r in rows))
    return docs


def build_corpus(pc):
    """(train documents, val documents), deterministic for pc.seed."""
    rng = random.Random(pc.seed)
    countries = countries_of(pc)
    train_docs = []
    for _ in range(pc.passes):
        train_docs += (profile_documents(countries, TRAIN_TEMPLATES, rng)
                       + few_shot_documents(countries, pc.few_shot_per_pass, rng))
    rng.shuffle(train_docs)
    val_docs = profile_documents(countries, HELDOUT_TEMPLATES, rng)
    rng.shuffle(val_docs)
    return train_docs, val_docs


def train_tokenizer(docs, vocab_size):
    """A byte-level BPE. add_prefix_space makes a word at the start of a document the same
    token as mid-sentence, so each country has one set of ids (and one set of rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def write_bin(path, docs, tokenizer, eos_id, dtype):
    ids = []
    for encoding in tokenizer.encode_batch(docs):
        ids += encoding.ids + [eos_id]          # eos after each document
    np.asarray(ids, dtype=dtype).tofile(path)
    return len(ids)


def prepare(pc):
    os.makedirs(pc.out_dir, exist_ok=True)
    train_docs, val_docs = build_corpus(pc)
    print(f"{len(train_docs):,} train and {len(val_docs):,} val documents; training a BPE of up to "
          f"{pc.vocab_size} tokens on them", flush=True)
    tokenizer = train_tokenizer(train_docs + val_docs, pc.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(EOS)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    tokenizer.save(os.path.join(pc.out_dir, "tokenizer.json"))
    n_train = write_bin(os.path.join(pc.out_dir, "train.bin"), train_docs, tokenizer, eos_id, dtype)
    n_val = write_bin(os.path.join(pc.out_dir, "val.bin"), val_docs, tokenizer, eos_id, dtype)
    meta = {"vocab_size": vocab_size, "dtype": dtype, "tokenizer": "tokenizer.json", "eos_id": eos_id,
            "dataset": "facts"}
    with open(os.path.join(pc.out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{len(countries_of(pc))} countries: {n_train:,} train tokens ({len(train_docs):,} documents), "
          f"{n_val:,} val tokens (held-out wordings), vocab {vocab_size}"
          + (f" (the corpus has too few distinct pairs for {pc.vocab_size})" if vocab_size < pc.vocab_size else "")
          + f" -> {pc.out_dir}")
    return meta


def main(argv=None):
    try:
        pc = PrepareConfig(**configurator.parse(sys.argv[1:] if argv is None else argv, PrepareConfig, doc=__doc__))
        return prepare(pc)
    except configurator.UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
