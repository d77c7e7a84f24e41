"""The prompt suite for benchmarking speculative decoding.

Speculative decoding speeds up some outputs far more than others: prompt lookup wins when the answer copies
the prompt (summaries, code edits, answers drawn from given context), a draft model wins when the answer is
predictable text, and both gain little on free-form reasoning. A single speed number therefore says little;
this suite groups prompts by task, in categories like Spec-Bench's, so a benchmark can report speed-up per
category and show where a technique helps.

Every prompt here was written for this project; none is copied from Spec-Bench, MT-Bench or any other data
set. The prompts are short to medium and plainly worded, because the model that runs them is small
(SmolLM2-135M-Instruct) and generation is capped at about 128 new tokens.

Categories (exactly 10 prompts each):

- ``multi_turn``: a chat, as a list of ``{"role", "content"}`` messages, with at least one earlier
  user/assistant exchange and a final user turn.
- ``translation``: "Translate to French/German/Spanish:" followed by one to three sentences of everyday English.
- ``summarization``: a passage of 120-250 words (news, meeting notes, product description, story) followed by
  an instruction to summarise it; summaries reuse the passage's phrases.
- ``qa``: a factual or explanatory question of one or two sentences.
- ``math``: a word problem or a calculation that takes a few steps.
- ``rag``: a "Context:" of two to four short retrieved passages (80-200 words in all) and a "Question:"
  answerable from them.
- ``code_edit``: a Python function of 8-25 lines and an instruction to change it and return the whole
  function, so the answer copies most of the input.

Use `suite()` to pick prompts and `suite_hash()` to record which version of the suite a result used.

To add a prompt, append it to its category's list below (text, or `_chat(...)` for ``multi_turn``); ids are
numbered in list order, so append rather than insert, and never edit a prompt in place without accepting that
`suite_hash()` changes. To add a category, add its name to `CATEGORIES`, add a list of prompts to `_PROMPTS`
under that name, and extend ``tests/test_suite.py`` with its checks. Write new prompts yourself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

CATEGORIES: tuple[str, ...] = ("multi_turn", "translation", "summarization", "qa", "math", "rag", "code_edit")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of the suite.

    `prompt` is plain text, or for ``multi_turn`` a list of chat messages; do not mutate it. It is left out of
    the hash (a list is unhashable), so prompts can still be put in sets and dict keys.
    """

    category: str
    id: str  # "<category>-NN", unique across the suite
    prompt: str | Messages = field(hash=False)


def _chat(*turns: str) -> Messages:
    """Messages alternating user, assistant, user, ..., from their contents; an odd count ends on a user turn."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def _summarize(passage: str, instruction: str) -> str:
    return f"{passage}\n\n{instruction}"


def _rag(passages: list[str], question: str) -> str:
    context = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return f"Answer the question using only the context below.\n\nContext:\n{context}\n\nQuestion: {question}\nAnswer:"


def _code_edit(instruction: str, code: str) -> str:
    return f"{instruction} Return the whole updated function.\n\n```python\n{code}```"


_MULTI_TURN: list[str | Messages] = [
    _chat(
        "I want to bake bread at home for the first time. What kind of bread should I start with?",
        "A simple no-knead white loaf is a good first bread. You only need flour, water, salt and yeast, and the "
        "dough rests overnight, so there is very little hands-on work.",
        "How long should it bake, and how can I tell when it is done?",
    ),
    _chat(
        "My friends and I are planning a weekend in the mountains. What should we do on the first day?",
        "Start with an easy hike of two or three hours so everyone gets used to the altitude, then have an early "
        "dinner and rest. Save the long trail for the second day.",
        "The forecast says it might rain. What should we pack?",
    ),
    _chat(
        "What is a dictionary in Python?",
        "A dictionary stores pairs of keys and values. You look up a value by its key, for example "
        'ages["Ana"] returns the age stored under the key "Ana".',
        "How do I loop over the keys and the values together?",
    ),
    _chat(
        "I want to start running, but I get tired after two minutes. Any advice?",
        "Try a walk-run plan: run for one minute, walk for two minutes, and repeat that eight times. Each week, "
        "run a little longer and walk a little less.",
        "How many days a week should I do this?",
    ),
    _chat(
        "The leaves of my potted plant are turning yellow. What could be wrong?",
        "Yellow leaves are most often a sign of too much water. If the soil stays wet for days, the roots cannot "
        "breathe and the leaves start to fade.",
        "So how often should I water it?",
        "Water it only when the top two centimetres of soil feel dry. For most indoor plants that is about once "
        "a week, a little less in winter.",
        "Should I also move it closer to the window?",
    ),
    _chat(
        "I need a birthday present for my sister. She loves reading.",
        "Some ideas: a book by an author she likes, a cosy reading lamp, a nice bookmark, or a gift card for a "
        "local bookshop.",
        "She already has a reading lamp and lots of bookmarks. Any other ideas under 30 dollars?",
    ),
    _chat(
        "Help me write a short email to my landlord about a broken heater.",
        "Hello Mr. Patel,\n\nThe heater in my flat stopped working yesterday. Could you send someone to repair "
        "it?\n\nThank you,\nLena",
        "Can you make it a bit more polite and add that I am at home every day after 5 pm?",
    ),
    _chat(
        "I want to learn Spanish. Where should I begin?",
        "Begin with the most common words and simple phrases, such as greetings, numbers and ordering food. Ten "
        "or fifteen minutes of practice every day works better than one long session a week.",
        "Are there good ways to practise listening?",
        "Yes. Listen to slow podcasts for learners, watch short videos with Spanish subtitles, and repeat the "
        "sentences out loud after the speaker.",
        "How long will it take before I can hold a simple conversation?",
    ),
    _chat(
        "How can I spend less money on groceries?",
        "Plan your meals for the week, make a shopping list and stick to it, buy store brands, and cook larger "
        "batches so you can eat the leftovers for lunch.",
        "Which of those tips usually saves the most money?",
    ),
    _chat(
        "Give me a name for a friendly dragon in a children's story.",
        "How about Ember? It sounds warm and gentle, and it hints at fire without sounding scary.",
        "I like it. Now write two sentences that introduce Ember to the reader.",
    ),
]

_TRANSLATION: list[str | Messages] = [
    "Translate to French: The bakery on the corner opens at seven in the morning. I usually buy a loaf of bread "
    "and two croissants before work.",
    "Translate to German: My brother lives in a small town near a lake. We visit him every summer and go "
    "swimming together.",
    "Translate to Spanish: Could you tell me where the train station is? I need to catch the last train to the "
    "city tonight.",
    "Translate to French: It rained all weekend, so we stayed at home. We watched old films and cooked a big pot "
    "of vegetable soup.",
    "Translate to German: The meeting has been moved to Thursday afternoon. Please bring your notes and the "
    "latest sales figures.",
    "Translate to Spanish: My grandmother grows tomatoes and peppers in her garden. Every August she makes sauce "
    "for the whole family.",
    "Translate to French: I am looking for a blue jacket in a medium size. Do you have one in stock?",
    "Translate to German: The children are playing in the park while their parents sit on a bench and talk.",
    "Translate to Spanish: We are going to the beach tomorrow if the weather is good. Do you want to come with us?",
    "Translate to French: Thank you for your help yesterday. The library was closed, but your directions to the "
    "bookshop were perfect.",
]

_SUMMARIZATION: list[str | Messages] = [
    _summarize(
        "The public library in Westbrook reopened on Saturday after eight months of renovation. The old building "
        "had a leaking roof, poor heating and no lift, which made the upper floor hard to reach for older "
        "visitors and parents with prams. The town council spent 2.4 million dollars on the work. The library "
        "now has a new roof, solar panels, a lift, and a larger children's room with space for reading groups. "
        "A quiet study area with forty desks has been added on the upper floor, and the opening hours have been "
        "extended to 9 pm on weekdays. Head librarian Rosa Klein said more than six hundred people came on the "
        'first day, many of them families. "People missed having a warm, free place to sit and read," she '
        "said. The library will hold free computer classes for adults starting next month, and the local "
        "history collection, which was stored during the renovation, will return to the shelves in the spring.",
        "Summarize this news article in two or three sentences.",
    ),
    _summarize(
        "Meeting notes, product team, Tuesday.\n"
        "Present: Amir, Julia, Ken, Sofia.\n"
        "1. Mobile app release: Version 3.2 is ready except for the new settings page. Ken found a crash when the "
        "user changes the language twice in a row. Ken will fix the crash by Thursday. The release moves from "
        "Friday to next Monday.\n"
        "2. Customer feedback: Sofia reviewed two hundred support tickets from last month. The most common "
        "complaint is that the search is slow on older phones. The second most common is that users cannot find "
        "the export button. Julia will move the export button to the main menu.\n"
        "3. Hiring: The team will interview three candidates for the designer role next week. Amir will send the "
        "schedule by Wednesday.\n"
        "4. Next meeting: Tuesday at 10 am. Sofia will present a plan for making search faster.",
        "Summarize these meeting notes as a short list of decisions and action items.",
    ),
    _summarize(
        "The TrailMate 28 is a lightweight daypack for hikers and city commuters. It holds 28 litres and weighs "
        "only 780 grams when empty. The main compartment opens wide with a curved zip, so you can pack and find "
        "things easily, and a padded sleeve inside fits a laptop of up to 15 inches. The fabric is recycled "
        "nylon with a water-resistant coating that keeps your things dry in light rain; a rain cover for heavy "
        "showers is tucked into a pocket at the bottom. The shoulder straps are padded and adjustable, and the "
        "back panel has a mesh that lets air flow so your back stays cooler on warm days. There are two side "
        "pockets for water bottles, a small top pocket for keys and a phone, and loops for hiking poles. The "
        "TrailMate 28 comes in green, grey and black, and has a five-year warranty.",
        "Summarize this product description in two sentences.",
    ),
    _summarize(
        "Mira had saved her pocket money for weeks to buy a red kite with a long yellow tail. On the first windy "
        "Sunday of spring, she took it to the hill behind her school. The kite rose quickly, higher than the "
        "trees, higher than the church tower. Mira laughed and let out more string. Then a strong gust pulled "
        "the string from her hands, and the kite drifted away over the rooftops. Mira ran down the hill, "
        "following the yellow tail across the sky, until she lost sight of it near the river. She sat on a bench "
        'and tried not to cry. After a while, an old man came along the path holding something red. "Is this '
        'yours?" he asked. The kite had landed in his garden. Its tail was torn, but the old man had already '
        "tied the pieces together with a piece of blue ribbon. Mira thanked him, and the next Sunday she came "
        "back to fly it with him.",
        "Summarize this story in three sentences.",
    ),
    _summarize(
        "From the first of March, the city's bus network will change to make journeys faster and more reliable. "
        "Line 4, which today runs every twenty minutes, will run every ten minutes between 6 am and 8 pm. Line 9 "
        "will no longer go through the old town, because the narrow streets cause long delays; instead, it will "
        "use the ring road and stop at the new hospital. A new night bus, Line N1, will run every hour from "
        "midnight to 5 am between the main station and the airport. Ticket prices will stay the same, but the "
        "paper day ticket will be replaced by a digital ticket that can be bought in the app or at machines at "
        "every stop. The transport office said the changes follow a survey of more than three thousand "
        "passengers, who asked above all for more frequent buses and better connections at night.",
        "Summarize the main changes described in this announcement in a few sentences.",
    ),
    _summarize(
        "Notes from the parents' committee meeting at Hillside Primary School, held on 12 October.\n"
        "The committee discussed the autumn fair. It will take place on Saturday 15 November from 10 am to 2 pm "
        "in the school hall. Last year the fair raised 1,800 dollars; this year's goal is 2,500 dollars, to be "
        "spent on new books for the library and a shade cover for the playground. Each class will run one stall, "
        "for example cakes, second-hand toys or face painting. Mrs. Osei will collect the stall plans by the end "
        "of October. The committee also talked about road safety. Several parents reported cars driving too fast "
        "outside the school gate in the morning. The head teacher will ask the town to paint a new crossing and "
        "put up a speed sign. Finally, volunteers are still needed to help with the school garden on Fridays.",
        "Summarize these notes in a short paragraph.",
    ),
    _summarize(
        "The BrewMate grinder makes it easy to grind fresh coffee at home. It uses steel burrs instead of blades, "
        "so the coffee is ground evenly and keeps more of its flavour. A dial on the front has twenty settings, "
        "from a very fine grind for espresso to a coarse grind for a French press. You choose the number of cups "
        "with a second dial, and the grinder stops by itself when the right amount is ground. The bean container "
        "holds 250 grams and has a tinted lid that protects the beans from light. The grinder is quiet, about as "
        "loud as a normal conversation, and the parts that touch the coffee can be removed and cleaned with a "
        "small brush that comes in the box. The BrewMate is 30 centimetres tall and fits under most kitchen "
        "cabinets. It is available in white and black.",
        "Summarize this product description in two or three sentences.",
    ),
    _summarize(
        "Every morning for forty years, Tomas rowed his small blue boat out of the harbour before sunrise. He "
        "knew the sea the way other people know their own street. One autumn morning the sky looked strange, "
        "grey in the east and yellow in the west, and the gulls stayed on the harbour wall. The younger "
        "fishermen laughed at him when he pulled his boat back onto the beach and went home. By noon the wind "
        "was howling, and the waves were crashing over the harbour wall. Two of the young men were still out at "
        "sea. Tomas watched from the window, then put on his coat and went to the harbour with a lamp. For three "
        "hours he stood at the end of the wall, waving the light, until both boats found their way in through "
        "the storm. The next morning the young fishermen came to his door and asked him to teach them to read "
        "the sky.",
        "Summarize this story in two or three sentences.",
    ),
    _summarize(
        "The Riverside community garden has won this year's Green City award for the best neighbourhood project. "
        "Five years ago the site was an empty car park covered with broken glass. A group of neighbours asked "
        "the city for permission to use it, and with the help of volunteers they removed the asphalt, brought in "
        "fresh soil and built forty raised beds. Today more than a hundred families grow vegetables, herbs and "
        "flowers there. The garden also has a small greenhouse, a tool shed, and a compost area that takes food "
        "waste from nearby cafes. Every Saturday morning, volunteers teach children how to plant seeds and care "
        "for the beds. The award comes with a prize of 5,000 dollars, which the group plans to spend on a "
        'rainwater tank and a covered area where people can sit in the shade. "The garden changed the whole '
        'street," said organiser Paul Mendes. "People who never spoke before now share their tomatoes."',
        "Summarize this article in two or three sentences.",
    ),
    _summarize(
        "Monthly report, customer support team, June.\n"
        "The team answered 4,120 tickets in June, ten percent more than in May. The average first reply time "
        "fell from six hours to four hours, mainly because two new support agents started at the beginning of "
        "the month. Customer satisfaction stayed high at 91 percent. The largest group of tickets, about a "
        "third, was about password resets. Most of these could be avoided, so the team asked the product team to "
        'add a clearer "Forgot password" link to the login page. The second largest group was about late '
        "deliveries in the northern region, caused by a problem at one warehouse; this problem was solved in the "
        "third week of June. In July the team will start offering live chat on weekdays from 9 am to 5 pm and "
        "will write ten new help articles on the most common questions.",
        "Summarize this report in three sentences.",
    ),
]

_QA: list[str | Messages] = [
    "Why do the leaves of many trees change colour in autumn?",
    "What is the difference between weather and climate?",
    "How does a refrigerator keep food cold?",
    "What causes the tides in the ocean?",
    "What is photosynthesis, and why is it important for life on Earth?",
    "How does a vaccine help the body fight a disease?",
    "Why does ice float on water instead of sinking?",
    "What is the difference between a virus and a bacterium?",
    "What does the CPU of a computer do? Explain it in simple words.",
    "Why do we see lightning before we hear the thunder?",
]

_MATH: list[str | Messages] = [
    "Sam buys 4 packs of pencils at 3 dollars per pack and pays with a 20-dollar bill. How much change does he "
    "get? Solve it step by step.",
    "A train travels at 80 kilometres per hour for 2.5 hours. How far does it go? Show your steps.",
    "What is 15 percent of 240? Show how you work it out.",
    "Anna has 36 apples. She gives one third of them to her neighbour and then eats 4. How many apples does she "
    "have left? Solve it step by step.",
    "A rectangle is 12 cm long and 7 cm wide. What are its area and its perimeter? Show your steps.",
    "Calculate (48 + 27) * 4 - 125 step by step.",
    "A recipe needs 250 grams of flour for 10 cookies. How much flour is needed for 24 cookies? Solve it step by step.",
    "Tom is three times as old as his daughter. In 12 years he will be twice as old as she will be then. How old "
    "are they now? Solve it step by step.",
    "A bicycle costs 300 dollars. The shop gives a 20 percent discount, and then 10 percent sales tax is added "
    "to the discounted price. What is the final price? Show your steps.",
    "A water tank holds 500 litres. A pipe fills it at 25 litres per minute, but a leak loses 5 litres per "
    "minute. How many minutes does it take to fill the empty tank? Solve it step by step.",
]

_RAG: list[str | Messages] = [
    _rag(
        [
            "Greenleaf Outdoor accepts returns of unused items within 30 days of purchase. Items must be in their "
            "original packaging and come with the receipt.",
            "Footwear that has been worn outdoors can only be returned if it has a manufacturing fault. Faulty "
            "items are covered for one year and can be exchanged or refunded.",
            "Refunds are paid to the original payment method within five working days.",
            'Gift cards and items marked "final sale" cannot be returned. Members of the Greenleaf Club can '
            "return unused items within 60 days instead of 30, if they show their membership card at the till.",
        ],
        "I wore my hiking boots on two walks and now the sole is coming off after 40 days. Can I return them?",
    ),
    _rag(
        [
            "The Lakeside swimming pool is open from 6 am to 9 pm on weekdays and from 8 am to 6 pm on Saturdays "
            "and Sundays. It is closed on public holidays.",
            "An adult ticket costs 6 dollars. Children under 16 pay 3 dollars, and children under 4 swim for free.",
            "Swimming lessons for beginners take place on Tuesday and Thursday evenings.",
            "Lockers in the changing rooms take a 1-dollar coin, which you get back when you open the locker. "
            "Towels can be rented at the front desk for 2 dollars.",
        ],
        "When is the pool open on Sunday, and how much does a ticket cost for a 10-year-old child?",
    ),
    _rag(
        [
            "To keep the battery of your Nova laptop healthy, avoid leaving it fully charged in a hot place, such "
            "as a car in summer.",
            "If you will not use the laptop for more than a month, charge the battery to about half, turn the "
            "laptop off, and store it in a cool, dry place.",
            "The battery can be replaced by an authorised service centre. A new battery is covered by a warranty "
            "of one year.",
            "The battery level is shown in the bottom right corner of the screen. A battery saver mode turns on "
            "by itself when the charge falls below 20 percent.",
        ],
        "How should I store my laptop if I am not going to use it for two months?",
    ),
    _rag(
        [
            "Harbor Tools was founded in 1987 by the sisters Elena and Grace Moreno in a small garage in Portland. "
            "The company first made hand tools for boat repair.",
            "In 1995 Harbor Tools moved to a larger factory in Tacoma and began to make electric drills and saws.",
            "Today the company employs about 900 people and sells its tools in twelve countries.",
            "Elena Moreno led the company until 2010, when she retired and handed the business to her son, "
            "Daniel. Grace Moreno still sits on the board.",
        ],
        "Who founded Harbor Tools, and in which year did the company move to Tacoma?",
    ),
    _rag(
        [
            "The Regio Pass allows unlimited travel on all regional trains and buses in the valley for seven "
            "days. It costs 45 dollars for adults and 20 dollars for students with a valid student card.",
            "The pass is not valid on express trains. Travellers who want to use an express train must buy a "
            "separate supplement of 8 dollars per trip.",
            "Bicycles can be taken on regional trains for free outside rush hours.",
            "Passes can be bought at any station ticket machine or in the Valley Transit app. A lost pass cannot "
            "be replaced.",
        ],
        "I am a student. How much is the Regio Pass, and can I use it on the express train?",
    ),
    _rag(
        [
            "Basil is a warm-weather herb. It needs at least six hours of direct sunlight a day and should be kept "
            "away from cold draughts.",
            "Water basil when the top of the soil feels dry, usually every two or three days in summer. Water the "
            "soil, not the leaves, to prevent disease.",
            "Pinch off the flowers as soon as they appear, because flowering makes the leaves taste bitter.",
            "Basil grows well in pots on a sunny windowsill. Harvest the leaves from the top of the plant; this "
            "helps it grow bushier and produce more leaves.",
        ],
        "How much sun does basil need, and what should I do when it starts to flower?",
    ),
    _rag(
        [
            'To reset your company password, open the staff portal and click "Forgot password". A reset link '
            "will be sent to your work email address and is valid for 30 minutes.",
            "New passwords must be at least 12 characters long and cannot be one of your last five passwords.",
            "If you are locked out after five failed attempts, call the IT help desk at extension 4400. The help "
            "desk is open from 8 am to 6 pm.",
            "For security reasons, the help desk will never ask for your password by email or by phone.",
        ],
        "I tried to log in five times and now my account is locked. What should I do?",
    ),
    _rag(
        [
            "The City Museum of Science is open from Tuesday to Sunday, 10 am to 5 pm. It is closed on Mondays.",
            "Admission is 12 dollars for adults and free for children under 12. On the first Thursday of every "
            "month, entry is free for everyone and the museum stays open until 9 pm.",
            "The planetarium show starts every hour and costs an extra 4 dollars.",
            "Guided tours for school groups must be booked at least two weeks in advance. The museum cafe on the "
            "ground floor serves lunch from 11 am to 3 pm.",
        ],
        "Can I visit the museum for free as an adult, and if so, when?",
    ),
    _rag(
        [
            "The lighthouse on Marrow Island was built in 1862 to guide ships past the rocks at the northern end "
            "of the island. Its light could be seen from 20 kilometres away.",
            "The last lighthouse keeper, Henrik Dahl, left the island in 1971, when the light became automatic.",
            "Since 2005 the lighthouse has been a small museum, which visitors can reach by ferry from May to "
            "September.",
            "The island has about 300 inhabitants, most of whom work in fishing or tourism. A walking path of six "
            "kilometres leads from the ferry harbour to the lighthouse.",
        ],
        "When did the lighthouse stop having a keeper, and why?",
    ),
    _rag(
        [
            "Release 2.3 of the fastgrid library adds support for reading Parquet files and makes sorting about "
            "twice as fast for large tables.",
            "In release 2.3 the function load_table() is deprecated; use read_table() instead. load_table() will "
            "be removed in release 3.0.",
            "Release 2.3 requires Python 3.9 or newer.",
            "The read_table() function takes the same arguments as load_table(), plus an optional columns "
            "argument for reading only some of the columns. Bug fixes for the 2.x series will continue until the "
            "end of next year.",
        ],
        "I still use load_table() in my code. Will it keep working, and what should I use instead?",
    ),
]

_CODE_EDIT: list[str | Messages] = [
    _code_edit(
        "Rename the function to average and the parameter l to values, and update the body to match.",
        "def calc(l):\n"
        "    if not l:\n"
        "        return 0.0\n"
        "    total = 0\n"
        "    for x in l:\n"
        "        total += x\n"
        "    result = total / len(l)\n"
        "    return result\n",
    ),
    _code_edit(
        "Add a parameter lowercase with default True; only convert the text to lower case when it is True.",
        "def word_counts(text):\n"
        "    counts = {}\n"
        "    text = text.lower()\n"
        "    for word in text.split():\n"
        "        word = word.strip('.,!?;:')\n"
        "        if not word:\n"
        "            continue\n"
        "        if word in counts:\n"
        "            counts[word] += 1\n"
        "        else:\n"
        "            counts[word] = 1\n"
        "    return counts\n",
    ),
    _code_edit(
        "This function should return the largest number in the list, but it skips the last element. Fix the bug.",
        "def find_max(numbers):\n"
        "    if not numbers:\n"
        "        raise ValueError('numbers is empty')\n"
        "    best = numbers[0]\n"
        "    for i in range(1, len(numbers) - 1):\n"
        "        if numbers[i] > best:\n"
        "            best = numbers[i]\n"
        "    return best\n",
    ),
    _code_edit(
        "Add type hints to the parameters and the return value of this function.",
        "def merge_settings(defaults, overrides, keep_none=False):\n"
        '    """Return the defaults updated with the overrides."""\n'
        "    merged = dict(defaults)\n"
        "    for key, value in overrides.items():\n"
        "        if key not in defaults:\n"
        "            raise KeyError(f'unknown setting: {key}')\n"
        "        if value is None and not keep_none:\n"
        "            continue\n"
        "        merged[key] = value\n"
        "    return merged\n",
    ),
    _code_edit(
        "Rewrite the for loop in this function as a list comprehension.",
        "def even_squares(numbers, limit=None):\n"
        '    """Return the squares of the even numbers, in order, at most limit of them."""\n'
        "    result = []\n"
        "    for n in numbers:\n"
        "        if n % 2 == 0:\n"
        "            result.append(n * n)\n"
        "    if limit is not None:\n"
        "        result = result[:limit]\n"
        "    return result\n",
    ),
    _code_edit(
        "This function crashes with ZeroDivisionError when no student has a grade. Fix it so it returns None for "
        "an empty dictionary.",
        "def class_report(grades):\n"
        "    total = 0\n"
        "    best_name = None\n"
        "    best_grade = -1\n"
        "    for name, grade in grades.items():\n"
        "        total += grade\n"
        "        if grade > best_grade:\n"
        "            best_name = name\n"
        "            best_grade = grade\n"
        "    mean = total / len(grades)\n"
        "    return {'mean': mean, 'best': best_name}\n",
    ),
    _code_edit(
        "Add a parameter default, with default value None, that is returned when a key is missing instead of "
        "raising KeyError.",
        "def get_nested(data, keys):\n"
        "    \"\"\"Follow keys into nested dictionaries, e.g. get_nested(d, ['a', 'b']) is d['a']['b'].\"\"\"\n"
        "    current = data\n"
        "    for key in keys:\n"
        "        if key not in current:\n"
        "            raise KeyError(key)\n"
        "        current = current[key]\n"
        "    return current\n",
    ),
    _code_edit(
        "This function should count vowels in both upper and lower case, but it misses capital letters. Fix the bug.",
        "def count_vowels(text):\n"
        '    """Return how many vowels the text contains."""\n'
        "    vowels = 'aeiou'\n"
        "    count = 0\n"
        "    for char in text:\n"
        "        if char in vowels:\n"
        "            count += 1\n"
        "    return count\n",
    ),
    _code_edit(
        "Add type hints to this function and a one-line docstring.",
        "def parse_line(line, sep=','):\n"
        "    fields = []\n"
        "    for part in line.split(sep):\n"
        "        part = part.strip()\n"
        "        if part.isdigit():\n"
        "            fields.append(int(part))\n"
        "        elif part == '':\n"
        "            fields.append(None)\n"
        "        else:\n"
        "            fields.append(part)\n"
        "    return fields\n",
    ),
    _code_edit(
        "Replace the while loop with a for loop over range().",
        "def countdown(start, step=1):\n"
        "    lines = []\n"
        "    n = start\n"
        "    while n > 0:\n"
        "        lines.append(f'{n}...')\n"
        "        n -= step\n"
        "    lines.append('Lift off!')\n"
        "    return '\\n'.join(lines)\n",
    ),
]

_PROMPTS: dict[str, list[str | Messages]] = {
    "multi_turn": _MULTI_TURN,
    "translation": _TRANSLATION,
    "summarization": _SUMMARIZATION,
    "qa": _QA,
    "math": _MATH,
    "rag": _RAG,
    "code_edit": _CODE_EDIT,
}

SUITE: tuple[SuitePrompt, ...] = tuple(
    SuitePrompt(category, f"{category}-{i:02d}", prompt)
    for category in CATEGORIES
    for i, prompt in enumerate(_PROMPTS[category], 1)
)


def suite(categories: Iterable[str] | None = None, per_category: int | None = None) -> list[SuitePrompt]:
    """Prompts of the given categories (all by default), the first `per_category` of each (all by default).

    Categories come out in the order given (a name given twice counts once), prompts in suite order within
    each. A single category name may be passed as a plain string. Raises ValueError for an unknown category
    or a negative `per_category`.
    """
    if categories is None:
        wanted: list[str] = list(CATEGORIES)
    else:
        names = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in names if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; valid categories are: {', '.join(CATEGORIES)}")
        wanted = list(dict.fromkeys(names))
    if per_category is not None and per_category < 0:
        raise ValueError(f"per_category must be >= 0, got {per_category}")
    chosen: list[SuitePrompt] = []
    for category in wanted:
        prompts = [p for p in SUITE if p.category == category]
        chosen.extend(prompts if per_category is None else prompts[:per_category])
    return chosen


def suite_hash() -> str:
    """SHA-256 (hex) of a canonical JSON of the whole suite: categories, ids and prompts, in order.

    Record it with benchmark results; it changes whenever a prompt is added, removed, reordered or edited.
    """
    records = [{"category": p.category, "id": p.id, "prompt": p.prompt} for p in SUITE]
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
